"""The sampler and the forward passes agree; padding never changes a result."""

import torch
from transformers import GPT2ForSequenceClassification

from rlhf_toy.models import (
    PolicyWithValueHead,
    build_policy,
    position_ids_from_mask,
    response_logits,
    reward_scores,
)
from rlhf_toy.rollout import encode_prompts, encode_responses, sample
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer

PROMPTS = ["the movie was", "the plot", "the"]  # lengths 3, 2, 1: real left padding


def _setup(seed=0):
    torch.manual_seed(seed)
    tok = build_tokenizer(get_task("sentiment").words)
    return tok, build_policy(tok).eval()


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_rollout_logprobs_equal_a_fresh_forward_pass_with_padding():
    tok, model = _setup()
    ids, mask = encode_prompts(tok, PROMPTS)
    assert mask[2].tolist() == [0, 0, 1]
    gen = torch.Generator().manual_seed(0)
    s = sample(model, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, temperature=0.7,
               generator=gen)
    logits = response_logits(model, s.prompt_ids, s.prompt_mask, s.response_ids, s.mask, 0.7)
    logp = torch.log_softmax(logits, -1).gather(-1, s.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(logp * s.mask, s.logprobs, atol=1e-5)
    assert (s.logprobs <= 0).all()
    # each prompt alone (no padding at all) gives the same log-probs
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode_prompts(tok, [prompt])
        n = int(s.mask[i].sum())
        resp = s.response_ids[i: i + 1, :n]
        alone = response_logits(model, one_ids, one_mask, resp, torch.ones_like(resp), 0.7)
        lp = torch.log_softmax(alone, -1).gather(-1, resp[..., None]).squeeze(-1)
        assert torch.allclose(lp[0], s.logprobs[i, :n], atol=1e-5)


def test_sampler_stops_at_eos_and_masks_after_it():
    tok, model = _setup()
    ids, mask = encode_prompts(tok, PROMPTS * 8)
    s = sample(model, ids, mask, 29, tok.eos_token_id, tok.pad_token_id, temperature=2.0,
               generator=torch.Generator().manual_seed(1))
    # an untrained model: some rows end with EOS early, others run to the length limit
    assert 0 < int(s.ended_with_eos.sum()) < len(s.ended_with_eos)
    for row, m, ended in zip(s.response_ids, s.mask, s.ended_with_eos, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one contiguous block from the start
        assert (row[n:] == tok.pad_token_id).all()
        assert bool(ended) == (row[n - 1].item() == tok.eos_token_id)
        assert (row[: n - 1] != tok.eos_token_id).all()


def test_greedy_sampler_equals_generate():
    tok, model = _setup(3)
    ids, mask = encode_prompts(tok, PROMPTS)
    s = sample(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, greedy=True)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ref = out[:, ids.shape[1]:]
    assert torch.equal(s.response_ids, ref[:, : s.response_ids.shape[1]])


def test_reward_model_scores_last_real_token_left_or_right_padded():
    tok, policy = _setup()
    rm = GPT2ForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(),
                                                                  "num_labels": 1})).eval()
    responses = ["very great .", "dull", "not bad but dull . the plot was great ."]
    p_ids, p_mask = encode_prompts(tok, PROMPTS)
    r_ids, r_mask = encode_responses(tok, responses)
    ours = reward_scores(rm, p_ids, p_mask, r_ids, r_mask)
    # right-padded whole sequences, scored by the HF class's own pad-aware pooling
    full = [tok(p + " " + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p, r in zip(PROMPTS, responses, strict=True)]
    width = max(map(len, full))
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in full])
    hf = rm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
    assert torch.allclose(ours, hf, atol=1e-5)
    # each sequence alone, no padding
    for i, x in enumerate(full):
        alone = rm(input_ids=torch.tensor([x])).logits[0, 0]
        assert torch.allclose(ours[i], alone, atol=1e-5)


def test_value_head_starts_at_zero_and_shares_the_forward_pass():
    tok, policy = _setup()
    model = PolicyWithValueHead(policy)
    p_ids, p_mask = encode_prompts(tok, PROMPTS)
    r_ids, r_mask = encode_responses(tok, ["very great .", "dull", "fun"])
    logits, values = model(p_ids, p_mask, r_ids, r_mask)
    assert values.shape == r_ids.shape and torch.count_nonzero(values) == 0
    assert torch.allclose(logits, response_logits(policy, p_ids, p_mask, r_ids, r_mask))
