"""`--model_name_or_path`: local Hugging Face causal LMs (a GPT-2 and a Llama built from
configs, with BPE tokenizers trained here; `tests/hf_models.py`) through every stage, the
lean GPT-2 path against `transformers`, Llama's cached sampling, and tokenizers as they
come (no pad token, a BOS, left or right padding)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import run_stage
from hf_models import corpus, save_gpt2, save_llama

from rlhf_toy.cli import PipelineConfig, _stage_argv, main
from rlhf_toy.config import PrefsConfig, SFTConfig
from rlhf_toy.errors import UsageError
from rlhf_toy.lean_gpt2 import lean_gpt2_supported
from rlhf_toy.methods import STAGES
from rlhf_toy.models import load_policy, response_logits, reward_model_from_policy, reward_scores
from rlhf_toy.rollout import encode_prompts, encode_responses, sample
from rlhf_toy.tokenizer import build_tokenizer, load_tokenizer
from rlhf_toy.train.common import check_vocab
from rlhf_toy.train.memory import estimate

PROMPTS = ["the movie was", "the plot", "the"]  # different lengths: real left padding
ARCHS = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
         "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification")}


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """{arch: directory} of a tiny GPT-2 and a tiny Llama with their tokenizers."""
    root, lines = tmp_path_factory.mktemp("hf_models"), corpus()
    torch.manual_seed(0)
    return {"gpt2": save_gpt2(str(root / "gpt2"), lines),
            "llama": save_llama(str(root / "llama"), lines)}


@pytest.fixture(scope="module")
def runs(local_models, tmp_path_factory):
    """{arch: (run dir, {stage: summary})}: sft, reward, ppo, grpo and dpo started from the
    local checkpoint (`--model_name_or_path`), prefs sampled from the SFT output (`--sft_dir`)."""
    out = {}
    evals = ["--n_eval_prompts", "16"]
    for arch, path in local_models.items():
        root, start = str(tmp_path_factory.mktemp(arch)), ["--model_name_or_path", path]
        stages = {"sft": [*start, "--max_steps", "30", "--n_train", "300", "--n_eval", "32",
                          *evals],
                  "prefs": ["--n_pairs", "200", *evals],
                  "reward": [*start, "--max_steps", "10", "--audit_steps", "5"],
                  "ppo": [*start, "--max_steps", "2", *evals],
                  "grpo": [*start, "--max_steps", "1", "--num_generations", "4", *evals],
                  "dpo": [*start, "--max_steps", "3", "--batch_size", "16", "--eval_steps",
                          "0", *evals]}
        out[arch] = root, {stage: run_stage(stage, root, *extra)
                           for stage, extra in stages.items()}
    return out


def _architectures(path: str) -> list[str]:
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)["architectures"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_runs_from_a_local_checkpoint(runs, local_models, arch):
    root, summaries = runs[arch]
    policy, reward = ARCHS[arch]
    for stage in ("sft", "reward", "ppo", "grpo", "dpo"):
        assert set(STAGES[stage].keys) <= set(summaries[stage]), stage
        for name in ("config.json", "model.safetensors", "tokenizer.json", "summary.json"):
            assert os.path.isfile(os.path.join(root, stage, name)), (stage, name)
        assert _architectures(os.path.join(root, stage)) == [reward if stage == "reward"
                                                             else policy]
        with open(os.path.join(root, stage, "run_config.json")) as fh:  # the recorded run
            assert json.load(fh)["model_name_or_path"] == local_models[arch]
    assert os.path.isfile(os.path.join(root, "ppo", "value_head.pt"))
    assert os.path.isdir(os.path.join(root, "reward", "audit"))
    # the saved tokenizer is the local one, with EOS as its pad token now
    saved, original = load_tokenizer(os.path.join(root, "sft")), load_tokenizer(local_models[arch])
    assert saved.get_vocab() == original.get_vocab()
    assert saved.pad_token_id == saved.eos_token_id == original.eos_token_id
    for stage in ("sft", "ppo", "dpo"):  # finite numbers, responses of the model's tokens
        s = summaries[stage]
        assert 0 < s["response_len"] <= 16 and 0 <= s["eos_frac"] <= 1, stage


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_switches_every_dropout_off(local_models, arch):
    """GPT-2's config has dropout 0.1 and the Llama's attention dropout 0.1: in train mode
    two forward passes would differ (and PPO's first ratio would not be 1)."""
    model = load_policy(local_models[arch]).train()
    ids = torch.arange(1, 9)[None]
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    assert torch.equal(first, model(input_ids=ids).logits)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def _encoded(tok):
    ids, mask = encode_prompts(tok, PROMPTS)
    resp, rmask = encode_responses(tok, ["very good .", "the acting was dull", "fun"])
    return ids, mask, resp, rmask


def test_lean_path_equals_transformers_on_a_local_gpt2(local_models):
    """The lean GPT-2 forward (used for a plain GPT-2) equals `transformers`' own forward
    (the fallback, forced by a forward hook) on every real response token."""
    tok, model = load_tokenizer(local_models["gpt2"]), load_policy(local_models["gpt2"]).eval()
    reward_model = reward_model_from_policy(local_models["gpt2"], 0.5).eval()
    batch = _encoded(tok)
    assert lean_gpt2_supported(model)
    with torch.no_grad():
        lean, lean_scores = response_logits(model, *batch), reward_scores(reward_model, *batch)
        hooks = [m.register_forward_hook(lambda *_: None) for m in (model, reward_model)]
        assert not lean_gpt2_supported(model)
        ref, ref_scores = response_logits(model, *batch), reward_scores(reward_model, *batch)
    for h in hooks:
        h.remove()
    real = batch[3].bool()
    assert torch.allclose(lean[real], ref[real], atol=1e-5)
    assert torch.allclose(lean_scores, ref_scores, atol=1e-5)
    assert lean_scores.std() > 1e-3  # the scores differ between rows (not all one value)


def test_llama_cached_sampling_equals_a_full_forward(local_models):
    """Log-probs of tokens sampled through the Llama's own KV cache (`DynamicCache`) equal a
    fresh no-cache forward over prompt + response, and each prompt alone (no padding)."""
    tok, model = load_tokenizer(local_models["llama"]), load_policy(local_models["llama"]).eval()
    ids, mask = encode_prompts(tok, PROMPTS)
    s = sample(model, ids, mask, 12, tok.eos_token_id, tok.pad_token_id, temperature=0.8,
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = response_logits(model, s.prompt_ids, s.prompt_mask, s.response_ids, s.mask, 0.8)
    logp = torch.log_softmax(logits, -1).gather(-1, s.response_ids[..., None]).squeeze(-1)
    assert s.mask.sum() > 3 * 2 and torch.allclose(logp * s.mask, s.logprobs, atol=1e-5)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode_prompts(tok, [prompt])
        n = int(s.mask[i].sum())
        resp = s.response_ids[i: i + 1, :n]
        with torch.no_grad():
            alone = response_logits(model, one_ids, one_mask, resp, torch.ones_like(resp), 0.8)
        lp = torch.log_softmax(alone, -1).gather(-1, resp[..., None]).squeeze(-1)
        assert torch.allclose(lp[0], s.logprobs[i, :n], atol=1e-5)
    # BPE prompts are counted in tokens: prompt + response must fit the 64 positions
    room = 64 - ids.shape[1]
    with pytest.raises(UsageError, match=f"max_new_tokens must be <= {room} so that the "
                                         f"longest prompt \\({ids.shape[1]} tokens\\)"):
        sample(model, ids, mask, room + 1, tok.eos_token_id, tok.pad_token_id)


def test_prompts_start_with_bos_only_where_the_tokenizer_adds_one(local_models):
    llama, gpt2 = (load_tokenizer(local_models[a]) for a in ("llama", "gpt2"))
    ids, mask = encode_prompts(llama, PROMPTS)
    first_real = ids.gather(1, mask.argmax(1, keepdim=True)).squeeze(1)  # (B,)
    assert first_real.tolist() == [llama.bos_token_id] * len(PROMPTS)
    assert llama("the")["input_ids"][0] == llama.bos_token_id  # what the tokenizer does itself
    for tok in (gpt2, build_tokenizer(["the", "movie", "was", "plot"])):  # no BOS by default
        ids, mask = encode_prompts(tok, PROMPTS)
        for row, m, prompt in zip(ids, mask, PROMPTS, strict=True):
            assert row[m.bool()].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]


def test_eos_as_pad_keeps_the_response_eos_and_its_score(local_models):
    """The classic pitfall: with pad == EOS, a mask from `ids != pad_token_id` drops every
    response's EOS. Masks here come from lengths, the sampler keeps mask 1 on the EOS it
    emits, and the reward is read at that EOS (not at the token before it)."""
    path = local_models["llama"]
    tok, model = load_tokenizer(path), load_policy(path).eval()
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    _, _, resp, rmask = _encoded(tok)
    lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) + 1
               for r in ["very good .", "the acting was dull", "fun"]]
    assert rmask.sum(-1).tolist() == lengths
    assert [resp[i, n - 1].item() for i, n in enumerate(lengths)] == [eos] * 3
    assert ((resp != tok.pad_token_id).sum(-1) < rmask.sum(-1)).all()  # the pitfall's mask
    # row 0 is forced to emit EOS at once, row 1 never: row 0 is then padded with EOS ids
    bias = torch.zeros(2, model.config.vocab_size)
    bias[0, eos], bias[1, eos] = 1e4, -1e4
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out + bias[:, None])
    ids, mask = encode_prompts(tok, PROMPTS[:2])
    s = sample(model, ids, mask, 5, eos, tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert s.mask.tolist()[0] == [1, 0, 0, 0, 0] and s.mask[1].sum() == 5
    assert s.response_ids[0].tolist() == [eos] * 5 and s.ended_with_eos.tolist() == [True, False]
    reward_model = reward_model_from_policy(path, 0.5).eval()
    with torch.no_grad():
        batch = reward_scores(reward_model, s.prompt_ids, s.prompt_mask, s.response_ids, s.mask)
        one_ids, one_mask = encode_prompts(tok, PROMPTS[:1])
        alone = reward_scores(reward_model, one_ids, one_mask, torch.tensor([[eos]]),
                              torch.ones(1, 1, dtype=torch.long))
        without_eos = reward_scores(reward_model, s.prompt_ids, s.prompt_mask, s.response_ids,
                                    torch.zeros_like(s.mask))
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    assert abs(batch[0] - without_eos[0]) > 1e-4  # the EOS's own hidden state is read


def _error_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("rlhf-toy: error: ") == 1, err
    return err[err.index("rlhf-toy: error: "):].strip()


def test_bad_model_directories_are_one_line_errors(runs, local_models, tmp_path, capsys):
    gpt2_reward = os.path.join(runs["gpt2"][0], "reward")
    llama = local_models["llama"]
    line = _error_line(["ppo", "--model_name_or_path", llama, "--reward_dir", gpt2_reward,
                        "--output_dir", str(tmp_path / "a"), "--device", "cpu"], capsys)
    assert (f"--reward_dir {gpt2_reward!r} has a vocabulary of 300 but the policy's "
            f"(--model_name_or_path {llama!r}) tokenizer has 120 tokens") in line
    line = _error_line(["sft", "--model_name_or_path", gpt2_reward, "--output_dir",
                        str(tmp_path / "b")], capsys)
    assert "holds a ['GPT2ForSequenceClassification'] model, not a causal LM policy" in line
    line = _error_line(["sft", "--model_name_or_path", "gpt2", "--output_dir",
                        str(tmp_path / "c")], capsys)
    assert "model_name_or_path must be a local directory" in line
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(llama, bare)
    os.remove(bare / "tokenizer.json")
    line = _error_line(["reward", "--model_name_or_path", str(bare), "--prefs_dir",
                        os.path.join(runs["llama"][0], "prefs"), "--output_dir",
                        str(tmp_path / "d")], capsys)
    assert "holds no tokenizer (tokenizer.json missing)" in line


def test_the_pipeline_gives_the_model_to_sft_alone(local_models, tmp_path):
    pipe = PipelineConfig(output_dir=str(tmp_path), model_name_or_path=local_models["gpt2"])
    sft = _stage_argv(pipe, "sft", SFTConfig)
    assert sft[sft.index("--model_name_or_path") + 1] == local_models["gpt2"]
    prefs = _stage_argv(pipe, "prefs", PrefsConfig)  # later stages read sft's output
    assert "--model_name_or_path" not in prefs
    assert prefs[prefs.index("--sft_dir") + 1] == os.path.join(str(tmp_path), "sft")


def test_ppo_on_a_local_llama_resumes_bit_exactly(runs, local_models, tmp_path, monkeypatch):
    """Stopped after its checkpoint at step 2 and resumed: the same weights, value head,
    metrics and summary as the run that never stopped (the checks of every stage's resume
    test, here through `--model_name_or_path`)."""
    from test_reliability_resume import PPO_TINY, _stopped_and_resumed, assert_same_run

    root, extra = runs["llama"][0], [*PPO_TINY, "--model_name_or_path", local_models["llama"]]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run_stage("ppo", root, "--output_dir", full, *extra)
    _stopped_and_resumed("ppo", root, resumed, extra, monkeypatch)
    assert_same_run(full, resumed, files=("model.safetensors",))
    heads = [torch.load(os.path.join(d, "value_head.pt"), weights_only=True)
             for d in (full, resumed)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_memory_estimate_counts_the_task_s_tokens_not_a_long_context(tmp_path):
    """A local model with 131,072 positions (Llama-3.1's) and a 128,256-token vocabulary
    runs 19-token sequences on the sentiment task (3 prompt words + 16 new tokens): the
    batch term is batch x 19 x (3 V + 16 n_layer H + 19) x 4 bytes, not 131,072 x ... (which
    would refuse any run)."""
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
              "hidden_size": 32, "max_position_embeddings": 131072, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = SimpleNamespace(model_name_or_path=str(tmp_path), task="sentiment", batch_size=32,
                          max_new_tokens=16, n_eval_prompts=128)
    parts = {what: size for size, what, _ in estimate(cfg, "ppo")}
    assert parts["a batch of 32 sequences"] == 32 * 19 * (3 * 128256 + 16 * 2 * 32 + 19) * 4


def test_vocabulary_check_accepts_only_a_table_padded_to_a_multiple_of_64(local_models):
    """The Llama tokenizer has 120 tokens: a table of 120, or of 128 = 2 x 64 (padded), fits;
    121 and 130 (not multiples of 64), 112 and 64 (smaller) do not, and the error names the
    checkpoint each came from."""
    tok = load_tokenizer(local_models["llama"])
    assert len(tok) == 120

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    check_vocab(tok, "--sft_dir 'a'", {"--sft_dir 'a'": model(120), "--reward_dir 'b'": model(128)})
    for vocab in (121, 130, 112, 64):
        with pytest.raises(UsageError, match=f"--reward_dir 'b' has a vocabulary of {vocab} but "
                                             "the policy's \\(--sft_dir 'a'\\) tokenizer has 120"):
            check_vocab(tok, "--sft_dir 'a'", {"--reward_dir 'b'": model(vocab)})
