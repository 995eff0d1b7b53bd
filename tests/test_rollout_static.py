"""The static-shape decode step (whole cache length + mask, CUDA-graph capturable) agrees
with the eager lean decoder; on CUDA, graph replay gives the eager tokens."""

import pytest
import torch

from rlhf_toy.lean_gpt2 import StaticDecoder, StaticKVCache, attention_mask_4d, lean_gpt2_hidden
from rlhf_toy.models import build_policy
from rlhf_toy.rollout import encode_prompts, sample
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer

PROMPTS = ["the movie was", "the plot", "the"]  # lengths 3, 2, 1: real left padding


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    tok = build_tokenizer(get_task("sentiment").words)
    return tok, build_policy(tok, **kw).eval()


@torch.no_grad()
def test_static_step_logits_equal_the_sliced_lean_step():
    tok, model = _setup(n_layer=3)
    ids, mask = encode_prompts(tok, PROMPTS * 2)
    b, p, new = ids.shape[0], ids.shape[1], 6
    attention = torch.cat([mask, torch.ones((b, new), dtype=torch.long)], dim=1)
    positions = (attention[:, :p].cumsum(-1) - 1).clamp(min=0)
    kv_eager, kv_static = StaticKVCache(p + new), StaticKVCache(p + new, zeroed=True)
    prefill = attention_mask_4d(attention, 0, p)
    for kv in (kv_eager, kv_static):
        lean_gpt2_hidden(model, ids, positions, prefill, kv, 0)
    gen = torch.Generator().manual_seed(3)
    token = torch.randint(0, len(tok), (b,), generator=gen)
    pos = positions[:, -1:] + 1
    dec = StaticDecoder(model, kv_static, attention, token, pos, p, 0.7, 0, False)
    for t in range(1, new):
        start = p + t - 1
        hidden = lean_gpt2_hidden(model, token[:, None], pos, attention_mask_4d(attention, start, 1),
                                  kv_eager, start)
        eager = model.lm_head(hidden[:, -1]).float() / 0.7
        out = dec.step()
        assert torch.allclose(out["logits"], eager, atol=1e-5, rtol=0)
        assert torch.allclose(out["logp"], torch.log_softmax(eager, -1), atol=1e-5, rtol=0)
        token = torch.randint(0, len(tok), (b,), generator=gen)
        dec.advance(token)
        pos = pos + 1


@pytest.mark.parametrize("greedy,top_k", [(True, 0), (False, 0), (False, 5)])
def test_static_sample_matches_eager_sample_on_cpu(greedy, top_k):
    tok, model = _setup()
    ids, mask = encode_prompts(tok, PROMPTS * 4)
    runs = [sample(model, ids, mask, 12, tok.eos_token_id, tok.pad_token_id, temperature=1.5,
                   top_k=top_k, greedy=greedy, generator=torch.Generator().manual_seed(5),
                   cuda_graph=graph) for graph in (False, True)]
    eager, static = runs
    assert torch.equal(eager.response_ids, static.response_ids)
    assert torch.equal(eager.mask, static.mask)
    assert torch.equal(eager.ended_with_eos, static.ended_with_eos)
    assert torch.allclose(eager.logprobs, static.logprobs, atol=1e-5, rtol=0)


def test_cpu_default_stays_on_the_eager_decoder():
    tok, model = _setup()
    ids, mask = encode_prompts(tok, PROMPTS)
    a = sample(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))
    b = sample(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id,
               generator=torch.Generator().manual_seed(0), cuda_graph=False)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_decode_matches_eager_decode(autocast, monkeypatch):
    tok, model = _setup(n_layer=2, n_embd=64)
    model = model.cuda()
    ids, mask = encode_prompts(tok, PROMPTS * 8, "cuda")
    captured = []  # one entry per successful capture (a failed one falls back with a warning)
    real_capture = StaticDecoder.capture

    def spy(self, *args, **kwargs):
        real_capture(self, *args, **kwargs)
        captured.append(self.graph is not None)

    monkeypatch.setattr(StaticDecoder, "capture", spy)

    def run(graph, greedy, seed=0):
        n = len(captured)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = sample(model, ids, mask, 20, tok.eos_token_id, tok.pad_token_id,
                         temperature=1.0, greedy=greedy,
                         generator=torch.Generator("cuda").manual_seed(seed), cuda_graph=graph)
        assert captured[n:] == ([True] if graph else [])
        return out

    eager, graph = run(False, True), run(True, True)
    if not autocast:  # fp32: the same tokens, log-probs up to kernel rounding
        assert torch.equal(eager.response_ids, graph.response_ids)
        assert torch.equal(eager.mask, graph.mask)
        assert torch.allclose(eager.logprobs, graph.logprobs, atol=1e-4, rtol=0)
    else:  # bf16: a near-tie argmax may flip on rounding; most rows must agree exactly
        n = min(eager.response_ids.shape[1], graph.response_ids.shape[1])
        rows = (eager.response_ids[:, :n] == graph.response_ids[:, :n]).all(-1)
        assert rows.float().mean().item() >= 0.75
        assert torch.allclose(eager.logprobs[rows, :n], graph.logprobs[rows, :n], atol=5e-2,
                              rtol=0)
    # sampling: the same generator stream, so (up to rare rounding flips) the same tokens
    eager, graph = run(False, False, 7), run(True, False, 7)
    if eager.response_ids.shape == graph.response_ids.shape:
        same = (eager.response_ids == graph.response_ids).float().mean().item()
        assert same > 0.95
    # replaying twice from the same seed is exactly reproducible
    again = run(True, False, 7)
    assert torch.equal(graph.response_ids, again.response_ids)
    assert torch.equal(graph.logprobs, again.logprobs)


def test_dpo_select_and_lazy_stats_match_the_eager_versions():
    """(DPO step overhead) `PreferenceTensors.select` sizes batches from host masks exactly
    as `data.select_batch` does, and the lazy stats read the same numbers."""
    from functools import partial

    from rlhf_toy.core import PREFERENCE_LOSSES
    from rlhf_toy.data import select_batch, tokenize_pairs
    from rlhf_toy.train.dpo import PreferenceTensors, batch_loss

    tok, model = _setup()
    prompts = ["the movie was", "the plot", "the", "the cast felt very"]
    chosen = tokenize_pairs(tok, prompts, [" good .", " very nice and fun .", " bad .", " ok ."])
    rejected = tokenize_pairs(tok, prompts, [" dull .", " bad .", " long and slow .", " no ."])
    n = len(prompts)
    data = PreferenceTensors(chosen, rejected, -torch.ones(n), -torch.ones(n))
    for index in (torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([3, 1, 0])):
        c, r = data.select(index)
        for got, want in ((c, select_batch(chosen, index)), (r, select_batch(rejected, index))):
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), k
    value, stats = batch_loss(model, data, torch.tensor([0, 2, 3]),
                              partial(PREFERENCE_LOSSES["sigmoid"], beta=0.5), tok.pad_token_id)
    assert isinstance(stats["reward_accuracy"], float)
    assert set(stats) == {"chosen_rewards", "rejected_rewards", "reward_accuracy",
                          "reward_margin", "logps_chosen", "logps_rejected"}
    margin = stats["chosen_rewards"] - stats["rejected_rewards"]
    assert abs(dict(stats)["reward_margin"] - margin) < 1e-6
