"""LoRA through peft and gradient checkpointing (`rlhf_toy/lora.py`).

The tiny policy: 2 layers, width 64, GPT-2's fused `c_attn` (64 -> 192). LoRA of rank r on
`c_attn` adds A (r x 64) and B (192 x r) per layer: 2 * r * (64 + 192) = 512 r weights.
"""

import math
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from rlhf_toy.cli import _stages, main
from rlhf_toy.config import RewardConfig, parse_config
from rlhf_toy.errors import UsageError
from rlhf_toy.lean_gpt2 import lean_gpt2_supported
from rlhf_toy.lora import (
    ADAPTER_WEIGHTS,
    AdapterDisabled,
    apply_lora,
    enable_checkpointing,
    reference_model,
    save_adapter_extras,
    target_modules,
)
from rlhf_toy.models import build_policy, load_policy, load_reward_model, response_logits
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer
from rlhf_toy.train.common import make_accelerator
from rlhf_toy.train.onpolicy import build_models
from rlhf_toy.train.ppo import PPO, PPOConfig
from rlhf_toy.train.reward import trainable_reward_model

R = 4
LORA_WEIGHTS = 2 * R * (64 + 192)  # two layers of A (r x 64) and B (192 x r)
PEFT = ["--use_peft", "--lora_r", str(R), "--lora_alpha", "8"]


def lora_cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"use_peft": True, "lora_r": R, "lora_alpha": 8,
                              "lora_dropout": 0.0, "lora_target_modules": [],
                              "gradient_checkpointing": False, **kw})


def save_tiny_policy(path: str):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(get_task("sentiment").words)
    model = build_policy(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def perturb_adapters(model, seed: int = 1) -> None:
    """B starts at zero (the adapter is a no-op): give it values so that it matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def inputs(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (3, 5), generator=gen)
    response = torch.randint(4, vocab, (3, 6), generator=gen)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0  # left padding
    response_mask = torch.ones_like(response)
    response_mask[1, 4:] = 0  # right padding
    return prompt, prompt_mask, response, response_mask


def real_logits(model, batch) -> torch.Tensor:
    """The logits at real response tokens (a padding position's are never read)."""
    return response_logits(model, *batch)[batch[3].bool()]  # (B, T, V) -> (N, V)


def distinct_numel(*modules) -> int:
    """Weights alive in `modules`, each storage counted once."""
    seen = {}
    for module in modules:
        for p in module.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_reference_is_the_base_with_the_adapter_disabled(tmp_path):
    """The reference holds no weights of its own (one copy of the base: base + 512 r
    weights alive), and gives the base checkpoint's logits while the adapted policy does not."""
    sft = str(tmp_path / "sft")
    base = save_tiny_policy(sft)
    policy = apply_lora(load_policy(sft), lora_cfg(), sft)
    perturb_adapters(policy)
    ref = reference_model(policy, lambda: pytest.fail("a second copy was loaded"))
    assert isinstance(ref, AdapterDisabled) and list(ref.parameters()) == []
    base_numel = sum(p.numel() for p in base.parameters())
    assert distinct_numel(policy, ref) == base_numel + LORA_WEIGHTS
    batch = inputs(base.config.vocab_size)
    with torch.no_grad():
        want = real_logits(base.eval(), batch)
        torch.testing.assert_close(real_logits(ref, batch), want, atol=1e-5, rtol=0)
        assert (real_logits(policy, batch) - want).abs().max() > 1e-2


def ppo_cfg(tiny_run, tmp_path, *extra) -> PPOConfig:
    out, _ = tiny_run
    return parse_config(PPOConfig, ["--output_dir", str(tmp_path / "ppo"), "--device", "cpu",
                                    "--sft_dir", os.path.join(out, "sft"),
                                    "--reward_dir", os.path.join(out, "reward"), *extra])


@pytest.mark.parametrize("use_peft", [True, False])
def test_ppo_models_hold_one_copy_of_the_base(tiny_run, tmp_path, use_peft):
    """`build_models` of PPO: with LoRA, policy + value head + reference hold the base once
    (base + 512 r + 65 value-head weights) and the optimizer holds the adapters and the
    value head only; without, the reference is a second copy (2 base + 65)."""
    cfg = ppo_cfg(tiny_run, tmp_path, *(PEFT if use_peft else []))
    _, unwrapped, optimizer, ref, _, _ = build_models(PPO, cfg, make_accelerator(cfg))
    base = sum(p.numel() for p in load_policy(cfg.sft_dir).parameters())
    head = 64 + 1
    assert all(p.requires_grad for p in unwrapped.value_head.parameters())
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    if use_peft:
        assert distinct_numel(unwrapped, ref) == base + LORA_WEIGHTS + head
        assert trained == LORA_WEIGHTS + head
    else:
        assert distinct_numel(unwrapped, ref) == 2 * base + head
        assert trained == base + head


def test_reward_lora_trains_the_score_head_in_full(tiny_run, tmp_path):
    """LoRA on the backbone, the score head (64 weights, no bias) a trainable full copy."""
    out, _ = tiny_run
    cfg = parse_config(RewardConfig, ["--output_dir", str(tmp_path / "r"), "--sft_dir",
                                      os.path.join(out, "sft"), *PEFT])
    model = trainable_reward_model(cfg)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "score.modules_to_save" in n for n in trained)
    assert sum(trained.values()) == LORA_WEIGHTS + 64


def run(stage: str, out: str, inputs_root: str, *extra: str) -> dict:
    """One stage with the tiny settings, its inputs from the tiny pipeline in `inputs_root`."""
    cls, runner, _ = _stages()[stage]
    argv = ["--output_dir", out, "--device", "cpu", *TINY.get(stage, [])]
    for name in ("sft_dir", "prefs_dir", "reward_dir"):
        if name in cls.__dataclass_fields__:
            argv += [f"--{name}", os.path.join(inputs_root, name.removesuffix("_dir"))]
    return runner(parse_config(cls, argv + list(extra)))


STAGE_ARGS = {"sft": ["--max_steps", "4", "--n_eval_prompts", "16"],
              "reward": ["--max_steps", "4", "--audit_steps", "2"],
              "dpo": ["--max_steps", "4", "--batch_size", "16", "--n_eval_prompts", "16"],
              "ppo": ["--max_steps", "2", "--n_eval_prompts", "16"],
              "grpo": ["--max_steps", "2", "--n_eval_prompts", "16"]}  # critic-free


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_lora_run_resumes_bit_exactly(tiny_run, tmp_path, stage):
    """A LoRA run resumed from its middle checkpoint ends with exactly the adapter (and
    value head / score head) of the uninterrupted run; its directory holds an adapter, and
    loading it gives base + adapter, merged, into a plain model."""
    root, _ = tiny_run
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    steps = int(STAGE_ARGS[stage][1])
    args = [*STAGE_ARGS[stage], *PEFT, "--save_steps", str(steps // 2)]
    run(stage, full, root, *args)
    shutil.copytree(full, resumed)
    run(stage, resumed, root, *args, "--resume_from_checkpoint",
        os.path.join(resumed, f"checkpoint-{steps // 2}"))
    a, b = (load_file(os.path.join(d, ADAPTER_WEIGHTS)) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # trained
    assert not os.path.exists(os.path.join(full, "model.safetensors"))
    if stage == "ppo":
        heads = [torch.load(os.path.join(d, "value_head.pt")) for d in (full, resumed)]
        assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    if stage == "reward":  # the merged model's head is the saved full copy
        saved = a["base_model.model.score.weight"]
        assert torch.equal(load_reward_model(full).score.weight, saved)
    else:
        assert type(load_policy(full)).__name__ == "GPT2LMHeadModel"


def test_lora_dpo_learns_the_held_out_preferences(tiny_run, tmp_path):
    """Adapters alone (r 8, lr 3e-3, 30 steps of 32 pairs) move DPO off the reference: the
    held-out loss starts at log 2 (policy = reference) and falls, the implicit-reward pair
    accuracy rises from 0.5. Measured on seeds 0, 1, 2: loss 0.6755, 0.6866, 0.6783
    (drops 0.018, 0.007, 0.015), accuracy 0.565, 0.545, 0.545; asserted with margins
    below the smallest of them."""
    root, _ = tiny_run
    summary = run("dpo", str(tmp_path / "dpo"), root, "--max_steps", "30", "--batch_size",
                  "32", "--n_eval_prompts", "16", "--eval_steps", "0", "--use_peft",
                  "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "3e-3")
    assert summary["eval_accuracy_before"] == 0.5
    assert summary["eval_loss"] < math.log(2) - 0.004
    assert summary["eval_accuracy"] > 0.5 + 0.02


def test_adapter_directory_survives_moves(tmp_path):
    """Its base is found relative to the adapter (the whole run moved), else at its
    absolute path (the stage directory alone moved); neither -> one-line error. Loading
    merges base + adapter: the logits of the adapted model."""
    run_dir = tmp_path / "run"
    sft, out = str(run_dir / "sft"), str(run_dir / "dpo")
    save_tiny_policy(sft)
    policy = apply_lora(load_policy(sft), lora_cfg(), sft)
    perturb_adapters(policy)
    policy.save_pretrained(out)
    save_adapter_extras(policy, out)
    batch = inputs(policy.config.vocab_size)
    with torch.no_grad():
        want = real_logits(policy.eval(), batch)
        torch.testing.assert_close(real_logits(load_policy(out), batch), want, atol=1e-5, rtol=0)
    alone = str(tmp_path / "alone" / "dpo")
    shutil.copytree(out, alone)  # "../sft" is missing there: the absolute path serves
    with torch.no_grad():
        torch.testing.assert_close(real_logits(load_policy(alone), batch), want, atol=1e-5,
                                   rtol=0)
        shutil.move(str(run_dir), str(tmp_path / "moved"))  # "../sft" serves
        moved = load_policy(str(tmp_path / "moved" / "dpo"))
        torch.testing.assert_close(real_logits(moved, batch), want, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="base model is missing"):
        load_policy(alone)  # neither its "../sft" nor the original place


def test_target_modules_defaults_and_unknown_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2 = build_policy(build_tokenizer(get_task("sentiment").words))
    assert target_modules(gpt2, []) == ["c_attn"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    assert target_modules(llama, []) == ["q_proj", "v_proj"]
    with pytest.raises(UsageError, match=r"lora_target_modules must name linear layers .*"
                                         r"c_attn.* \(got 'q_proj'\)"):
        target_modules(gpt2, ["q_proj"])


@pytest.mark.parametrize("argv, message", [
    (["--lora_r", "0"], "lora_r must be > 0 (got 0)"),
    (["--lora_alpha", "-1"], "lora_alpha must be > 0 (got -1)"),
    (["--lora_dropout", "1.0"], "lora_dropout must be in [0, 1) (got 1.0)"),
])
def test_bad_lora_settings_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_config(RewardConfig, argv)


def test_unknown_target_module_is_one_line_exit_2(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    code = main(["dpo", "--output_dir", str(tmp_path / "dpo"), "--device", "cpu",
                 "--sft_dir", os.path.join(out, "sft"), "--prefs_dir", os.path.join(out, "prefs"),
                 "--reward_dir", os.path.join(out, "reward"), "--use_peft",
                 "--lora_target_modules", "c_atn"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "(got 'c_atn')" in err


@pytest.mark.parametrize("use_peft", [False, True])
def test_gradient_checkpointing_same_loss_and_gradients(tmp_path, use_peft):
    """The same loss and gradients with and without checkpointing, and it is really on:
    a block's attention runs twice per step (forward, then again in the backward pass)."""
    sft = str(tmp_path / "sft")
    save_tiny_policy(sft)
    results = []
    for checkpointing in (False, True):
        cfg = lora_cfg(use_peft=use_peft, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same initial A
        model = apply_lora(load_policy(sft), cfg, sft)
        perturb_adapters(model)
        enable_checkpointing(model, cfg)
        model.train()
        calls = []
        attention = model.get_submodule("transformer.h.0.attn" if not use_peft
                                        else "base_model.model.transformer.h.0.attn")
        attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        batch = inputs(model.config.vocab_size)
        loss = real_logits(model, batch).log_softmax(-1).mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    # without checkpointing, a plain GPT-2 trains on the lean path (no module call)
    assert (calls0, calls1) == (1 if use_peft else 0, 2)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5)


def test_lean_path_is_off_while_training_with_checkpointing(tmp_path):
    model = save_tiny_policy(str(tmp_path / "sft"))
    enable_checkpointing(model, lora_cfg(use_peft=False, gradient_checkpointing=True))
    assert lean_gpt2_supported(model.eval())  # no checkpointing outside training
    assert not lean_gpt2_supported(model.train())
