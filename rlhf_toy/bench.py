"""Speed benchmark: rlhf_toy against `transformers.generate` and TRL, in one process.

Shapes: B batch, P prompt length, T response length, L = P + T.

Each row runs ours and the baseline interleaved (A B A B ...) after a warm-up, on the
same model weights, tokenizer, data and batch shape, and reports medians:

- `rollout`: `rollout.sample` vs `model.generate` (same sampling settings, KV cache on).
- `ppo_iteration`: one rlhf_toy PPO iteration (`collect_rollout` + `update` of
  `train/onpolicy.py` with `PPO`) vs one `trl.RLOOTrainer` generation cycle with the same
  number of completions of the same maximum length and the same number of optimizer
  updates. TRL 1.x has no PPO trainer;
  RLOO is its nearest on-policy trainer (no critic; a reward model and a KL reference).
- `grpo_step`, `rloo_step`: one iteration of `GRPO` / `RLOO` on the same loop vs one
  `trl.GRPOTrainer` / `trl.RLOOTrainer` generation cycle at equal work: same prompts per
  cycle and completions per prompt, lengths, number of updates, loss and KL coefficient.
- `dpo_step`: one rlhf_toy DPO optimizer step (cached reference log-probs) vs one
  `trl.DPOTrainer` step (its default: a reference forward pass every step; at the `gpt2`
  size it precomputes the reference log-probs too, so both sides do the same work).

The `gpt2` size is GPT-2 small's shape on the `long_review` task (64-token responses),
where compute, not per-call overhead, dominates.

TRL's trainers drive their own loop; a `TrainerCallback` runs our unit between two of
their units, so the two still alternate. Timing, memory, FLOPs and the table:
`bench_common.py`.
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from rlhf_toy.bench_common import (
    TEMPERATURE,
    Interleave,
    Setup,
    Size,
    Timer,
    matmul_peak_flops,
    n_flop_params,
    ours_only,
    quiet,
    row_result,
    sync,
    trl_args,
)
from rlhf_toy.core import PREFERENCE_LOSSES
from rlhf_toy.lean_gpt2 import cuda_graphs_enabled
from rlhf_toy.models import PolicyWithValueHead, freeze
from rlhf_toy.rollout import encode_prompts, sample
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer
from rlhf_toy.train.common import clip_grad_norm, optimizer_step

SIZES = {
    "test": Size(1, 32, 2, 32, 8, 4, 1, 4, repeats=2, warmup=0),  # smoke tests only
    "tiny": Size(2, 64, 4, 32, 32, 16, 4, 16, repeats=10, warmup=2),
    "small": Size(4, 256, 4, 96, 64, 32, 2, 32, repeats=6, warmup=2),
    "medium": Size(6, 384, 6, 96, 256, 64, 1, 64, repeats=5, warmup=1),
    # GPT-2 small's shape (configs/gpt2) on long_review: 64-token responses, compute-bound;
    # an on-policy learning rate too small to move the policy: at 1e-5 a few Adam steps of
    # this model already shorten its responses, and the two sides' work would drift apart
    "gpt2": Size(12, 768, 12, 256, 8, 4, 1, 64, repeats=3, warmup=1, task="long_review",
                 rows=("rollout", "ppo_iteration", "dpo_step"), trl_dpo_precompute_ref=True,
                 onpolicy_lr=1e-9),
}
def bench_rollout(st: Setup, peak_flops: float) -> dict:
    """`rollout.sample` vs `model.generate`: same prompts, temperature, length, KV cache."""
    s, tok = st.size, st.tokenizer
    model = st.policy().to(st.device).eval()
    ids, mask = encode_prompts(tok, st.prompts(s.batch_size), st.device)
    timer = Timer(st.device, s.warmup)
    gen = torch.Generator(device=st.device).manual_seed(st.seed)
    lengths, base_lengths = [], []

    def ours():
        with torch.no_grad(), st.acc.autocast():
            out = sample(model, ids, mask, s.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                         TEMPERATURE, 0, generator=gen)
        lengths.append(out.response_ids.shape[1])

    def baseline():
        with torch.no_grad(), st.acc.autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                           temperature=TEMPERATURE, top_k=0, top_p=1.0,
                           max_new_tokens=s.max_new_tokens, use_cache=True,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        base_lengths.append(out.shape[1] - ids.shape[1])

    for _ in range(s.warmup + s.repeats):
        timer.run_ours(ours)
        sync(st.device)
        t0 = time.perf_counter()
        baseline()
        sync(st.device)
        timer.baseline.append(time.perf_counter() - t0)
    t = statistics.median(lengths)
    tokens = s.batch_size * t
    flops = 2 * n_flop_params(model) * s.batch_size * (ids.shape[1] + t)
    note = (f"{s.batch_size} prompts x up to {s.max_new_tokens} new tokens, T={TEMPERATURE}, "
            "top_k=0, KV cache; tokens = generated positions (median per call: ours "
            f"{t:g}, generate {statistics.median(base_lengths):g})")
    if st.device.type == "cuda":
        note += ("; ours replays one CUDA graph per decode step (captured per call, timed)"
                 if cuda_graphs_enabled() else "; CUDA graphs off (RLHF_TOY_CUDA_GRAPHS=0)")
    return row_result("rollout", "transformers generate", timer, tokens, flops, peak_flops, note)


def _onpolicy_config(st: Setup, cls, **kw):
    """An on-policy stage config of this size; `kw` sets the method's own fields."""
    s = st.size
    return cls(output_dir="unused", batch_size=s.batch_size, mini_batch_size=s.mini_batch_size,
               ppo_epochs=s.ppo_epochs, max_new_tokens=s.max_new_tokens, temperature=TEMPERATURE,
               learning_rate=s.onpolicy_lr, device=st.device.type,
               mixed_precision="bf16" if st.device.type == "cuda" else "no", **kw)


def _num_generations(s: Size) -> int:
    return 4 if s.batch_size % 4 == 0 else 2


@dataclass(frozen=True)
class OnPolicyRow:
    """One on-policy row: our method and config, and the TRL trainer doing the same work."""

    name: str
    method: object  # train.onpolicy.OnPolicyMethod
    cfg: object  # its OnPolicyConfig
    critic: bool  # ours trains a value head (PPO)
    trl: str  # "RLOO" or "GRPO": trl.<trl>Trainer / trl.<trl>Config
    trl_kw: dict  # the trainer's method fields (beta, loss type, ...)
    note: str


def _onpolicy_rows(st: Setup) -> dict[str, OnPolicyRow]:
    from rlhf_toy.train.grpo import GRPO, GRPOConfig
    from rlhf_toy.train.ppo import PPO, PPOConfig
    from rlhf_toy.train.rloo import RLOO, RLOOConfig

    s, g = st.size, _num_generations(st.size)
    ppo_note = (f"ours: {s.batch_size} rollouts x <= {s.max_new_tokens} tokens, reward model, "
                "ref, value head; TRL 1.x has no PPO trainer, baseline is RLOOTrainer "
                f"(nearest on-policy): {s.batch_size} completions ({g} per prompt), beta=0.05 "
                "ref")
    return {
        "ppo_iteration": OnPolicyRow(
            "ppo_iteration", PPO, _onpolicy_config(st, PPOConfig, beta=0.05), True, "RLOO",
            {"beta": 0.05}, ppo_note),
        "grpo_step": OnPolicyRow(
            "grpo_step", GRPO, _onpolicy_config(st, GRPOConfig, num_generations=g, beta=0.04),
            False, "GRPO", {"beta": 0.04, "loss_type": "grpo", "scale_rewards": "group"},
            f"both: {s.batch_size // g} prompts x {g} completions, group-normalized rewards, "
            "token-level clipped loss + 0.04 * k3 to the ref (TRL loss_type=grpo)"),
        "rloo_step": OnPolicyRow(
            "rloo_step", RLOO, _onpolicy_config(st, RLOOConfig, num_generations=g, beta=0.05),
            False, "RLOO", {"beta": 0.05},
            f"both: {s.batch_size // g} prompts x {g} completions, leave-one-out baseline, "
            "beta=0.05 sequence KL in the reward, sequence-level clipped ratio"),
    }


def bench_onpolicy(st: Setup, peak_flops: float, row: OnPolicyRow) -> dict:
    """One rlhf_toy on-policy iteration vs one TRL generation cycle (same updates)."""
    from rlhf_toy.models import CriticFreePolicy
    from rlhf_toy.train.onpolicy import collect_rollout, iteration_prompts, update

    s, cfg, tok = st.size, row.cfg, st.tokenizer
    updates = s.ppo_epochs * (s.batch_size // s.mini_batch_size)
    model = (PolicyWithValueHead if row.critic else CriticFreePolicy)(st.policy())
    ref = freeze(st.policy()).to(st.device)
    rm = freeze(st.reward_model()).to(st.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=True)  # as run_ppo
    model, optimizer = st.acc.prepare(model, optimizer)
    unwrapped = st.acc.unwrap_model(model)
    timer = Timer(st.device, s.warmup)
    it = [0]
    lengths = []

    def ours():
        it[0] += 1
        gen = torch.Generator(device=st.device).manual_seed(st.seed + it[0])
        prompts = iteration_prompts(st.task, cfg, st.seed * 1000 + it[0])
        unwrapped.eval()
        with st.acc.autocast():
            batch = collect_rollout(row.method, unwrapped, ref, rm, tok, prompts, cfg, cfg.beta,
                                    gen)
        lengths.append(batch.prompt_ids.shape[1] + batch.response_ids.shape[1])
        model.train()
        update(row.method, model, optimizer, st.acc, batch, cfg, cfg.beta,
               torch.Generator().manual_seed(it[0]))

    g = _num_generations(s)
    note = (f"{row.note}; {s.batch_size} completions x <= {s.max_new_tokens} tokens, "
            f"{s.ppo_epochs} epochs x {s.batch_size // s.mini_batch_size} minibatches = "
            f"{updates} updates on each side")
    if not _have_trl():
        ours_only(timer, ours, s)
        return row_result(row.name, None, timer, *_ppo_tokens_flops(s, unwrapped.policy, lengths),
                    peak_flops, note + "; trl not installed: baseline skipped")
    import trl
    from datasets import Dataset

    config_cls, trainer_cls = getattr(trl, f"{row.trl}Config"), getattr(trl, f"{row.trl}Trainer")
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = os.path.join(tmp, "policy")
        st.policy().save_pretrained(policy_dir)
        tok.save_pretrained(policy_dir)
        units = s.warmup + s.repeats
        # trailing space: TRL scores prompt + completion as one string
        prompts = [p + " " for p in st.prompts(units * s.batch_size, salt=99)]
        args = trl_args(
            config_cls, os.path.join(tmp, "out"), st.device.type, st.seed,
            per_device_train_batch_size=s.mini_batch_size, gradient_accumulation_steps=1,
            steps_per_generation=s.batch_size // s.mini_batch_size, num_iterations=s.ppo_epochs,
            num_generations=g, max_completion_length=s.max_new_tokens, temperature=TEMPERATURE,
            top_k=0, learning_rate=s.onpolicy_lr, max_steps=units * updates, disable_dropout=True,
            max_grad_norm=1.0, **row.trl_kw)
        trainer = trainer_cls(model=policy_dir, reward_funcs=rm, args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=tok, reward_processing_classes=tok,
                              callbacks=[Interleave(timer, updates, ours).callback()])
        quiet(trainer).train()
    return row_result(row.name, f"trl {row.trl}Trainer", timer,
                *_ppo_tokens_flops(s, unwrapped.policy, lengths), peak_flops, note)


def bench_ppo(st: Setup, peak_flops: float) -> dict:
    """One PPO iteration (critic, GAE) vs one RLOOTrainer generation cycle."""
    return bench_onpolicy(st, peak_flops, _onpolicy_rows(st)["ppo_iteration"])


def bench_grpo(st: Setup, peak_flops: float) -> dict:
    """One GRPO iteration vs one GRPOTrainer generation cycle."""
    return bench_onpolicy(st, peak_flops, _onpolicy_rows(st)["grpo_step"])


def bench_rloo(st: Setup, peak_flops: float) -> dict:
    """One RLOO iteration vs one RLOOTrainer generation cycle."""
    return bench_onpolicy(st, peak_flops, _onpolicy_rows(st)["rloo_step"])


def _ppo_tokens_flops(s: Size, policy, lengths: list[int]) -> tuple[float, float]:
    """Sequence tokens (B x L) of one iteration and its FLOPs: rollout, reward, reference
    and policy/value forwards (2 N each), `ppo_epochs` forward+backward passes (6 N)."""
    seq = s.batch_size * statistics.median(lengths)
    return seq, (4 * 2 + s.ppo_epochs * 6) * n_flop_params(policy) * seq


def _have_trl() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def preference_pairs(st: Setup, n: int) -> dict[str, list[str]]:
    """`n` prompt/chosen/rejected string triples from the task's own response generator.
    Responses start with a space, as `rlhf-toy prefs` writes them, so that TRL's
    prompt + response join tokenizes exactly as we do."""
    rng = random.Random(st.seed)
    prompts = st.prompts(n, salt=7)
    return {"prompt": prompts,
            "chosen": [" " + st.task.sample_response(p, rng) for p in prompts],
            "rejected": [" " + st.task.sample_response(p, rng) for p in prompts]}


def bench_dpo(st: Setup, peak_flops: float) -> dict:
    """rlhf_toy DPO steps vs DPOTrainer steps on the same preference batches."""
    from rlhf_toy.data import tokenize_pairs
    from rlhf_toy.train.dpo import PreferenceTensors, batch_loss, precompute_reference_logps

    s, tok = st.size, st.tokenizer
    units = s.warmup + s.repeats
    pairs = preference_pairs(st, units * s.batch_size)
    model = st.policy()
    ref = freeze(st.policy()).to(st.device)
    chosen = tokenize_pairs(tok, pairs["prompt"], pairs["chosen"], st.device)
    rejected = tokenize_pairs(tok, pairs["prompt"], pairs["rejected"], st.device)
    with st.acc.autocast():
        ref_c, ref_r = precompute_reference_logps(ref, chosen, rejected, tok.pad_token_id)
    data = PreferenceTensors(chosen, rejected, ref_c, ref_r)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as run_dpo
    model, optimizer = st.acc.prepare(model, optimizer)
    timer = Timer(st.device, s.warmup)
    step = [0]
    real = sum(chosen[k].sum(-1) + rejected[k].sum(-1)
               for k in ("prompt_mask", "response_mask")).cpu()  # (N,) real tokens per pair

    loss = partial(PREFERENCE_LOSSES["sigmoid"], beta=0.1)  # as run_dpo's loss_fn
    params = list(model.parameters())  # listed once, as run_dpo

    def ours():
        index = torch.arange(step[0] * s.batch_size, (step[0] + 1) * s.batch_size)
        step[0] = (step[0] + 1) % units
        model.train()
        value, _ = batch_loss(model, data, index, loss, tok.pad_token_id)
        st.acc.backward(value)
        clip_grad_norm(st.acc, params, 1.0)
        optimizer_step(st.acc, optimizer)

    trl_ref = ("DPOTrainer precomputes them too (precompute_ref_log_probs, untimed): equal work"
               if s.trl_dpo_precompute_ref else
               "DPOTrainer with its defaults runs the reference every step")
    note = (f"{s.batch_size} pairs per step (the same pairs, in order), beta=0.1; ours caches "
            f"reference log-probs (computed once, untimed); {trl_ref}; tokens = real "
            "prompt+response tokens of chosen and rejected")
    if not _have_trl():
        ours_only(timer, ours, s)
        base = None
        note += "; trl not installed: baseline skipped"
    else:
        _run_trl_dpo(st, pairs, timer, ours)
        base = "trl DPOTrainer"
    tokens = float(real.sum()) / units  # per step, on average
    n = n_flop_params(st.acc.unwrap_model(model))
    return row_result("dpo_step", base, timer, tokens, 6 * n * tokens, peak_flops, note)


def _run_trl_dpo(st: Setup, pairs: dict, timer: Timer, ours) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = st.size
    units = s.warmup + s.repeats
    policy = st.policy()
    with tempfile.TemporaryDirectory() as tmp:
        args = trl_args(DPOConfig, tmp, st.device.type, st.seed,
                        per_device_train_batch_size=s.batch_size,
                         gradient_accumulation_steps=1, beta=0.1, learning_rate=1e-5,
                         max_steps=units, max_length=s.n_positions,
                         train_sampling_strategy="sequential",
                         precompute_ref_log_probs=s.trl_dpo_precompute_ref,
                         max_grad_norm=1.0)
        # trailing space: TRL tokenizes prompt + completion as one string
        data = Dataset.from_dict({**pairs, "prompt": [p + " " for p in pairs["prompt"]]})
        trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args,
                             train_dataset=data, processing_class=st.tokenizer,
                             callbacks=[Interleave(timer, 1, ours).callback()])
        quiet(trainer).train()


ROWS = {"rollout": bench_rollout, "ppo_iteration": bench_ppo, "grpo_step": bench_grpo,
        "rloo_step": bench_rloo, "dpo_step": bench_dpo}


def default_rows(size: str) -> tuple[str, ...]:
    """The rows `--size SIZE` runs without `--rows`."""
    return SIZES[size].rows or tuple(ROWS)


def run_bench(device: str = "cpu", size: str = "tiny", rows: tuple[str, ...] | None = None,
              repeats: int | None = None, warmup: int | None = None, seed: int = 0,
              shape: Size | None = None, peak_tflops: float | None = None) -> dict:
    """Run the benchmark rows (default: `default_rows(size)`); `shape` replaces the size's
    model and batch shape under its name (the smoke tests run a size's rows on a small
    model). MFU is over `peak_tflops` if given, else over the matmul FLOP/s measured at the
    start. Returns `{"device", "size", "matmul_tflops", "peak_tflops", "rows": [...]}`."""
    from dataclasses import replace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    AcceleratorState._reset_state()  # this process may already hold other settings
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    sz = shape or SIZES[size]
    sz = replace(sz, repeats=sz.repeats if repeats is None else repeats,
                 warmup=sz.warmup if warmup is None else warmup)
    task = get_task(sz.task)
    st = Setup(acc.device, acc, build_tokenizer(task.words), task, sz, seed)
    measured = matmul_peak_flops(acc.device)
    peak = measured if peak_tflops is None else peak_tflops * 1e12
    out = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} "
           "threads)", "size": size, "matmul_tflops": measured / 1e12,
           "peak_tflops": peak / 1e12, "precision": "bf16 autocast (accelerate)" if cuda
           else "fp32", "rows": []}
    for name in rows or default_rows(size):
        out["rows"].append(ROWS[name](st, peak))
    return out
