"""TRL's RLOOTrainer as PPO's quality baseline (TRL 1.x has no PPO trainer): the same SFT
policy, reward model, rollout budget and held-out evaluation as `rlhf-toy ppo`.

    python scripts/trl_rloo_baseline.py --run_dir runs/sweep/sentiment/seed0 --seed 0 \
        [--task sentiment] [--beta 0.05] [--learning_rate 3e-4]

RUN_DIR holds `sft/` and `reward/` (a pipeline's or `scripts/sweep_defaults.py`'s seed
directory). RLOOTrainer trains a copy of the SFT policy for PPO's budget: `--iterations`
generation cycles of `--batch_size` completions (`--num_generations` per prompt, a
leave-one-out baseline, `beta` times the sequence KL in the reward), each cycle
`ppo_epochs` x `batch_size / mini_batch_size` optimizer steps, as PPO's defaults. The
policy is then measured exactly as PPO's (`evaluate_policy` on the task's held-out
prompts, KL to the SFT reference), into RUN_DIR/trl_rloo_beta<beta>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import random  # noqa: E402

import torch  # noqa: E402

from rlhf_toy.bench_common import trl_args  # noqa: E402
from rlhf_toy.evaluate import SamplingArgs, eval_prompts, evaluate_policy  # noqa: E402
from rlhf_toy.models import freeze, load_policy, load_reward_model  # noqa: E402
from rlhf_toy.tasks import get_task  # noqa: E402
from rlhf_toy.tokenizer import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--beta", type=float, default=0.05, help="TRL's default")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="PPO's default")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--mini_batch_size", type=int, default=16)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--n_eval_prompts", type=int, default=128)
    args = p.parse_args(argv)
    import trl
    from datasets import Dataset

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(args.seed)
    sft, reward = os.path.join(args.run_dir, "sft"), os.path.join(args.run_dir, "reward")
    out = os.path.join(args.run_dir, f"trl_rloo_beta{args.beta:g}")
    task, tok = get_task(args.task), load_tokenizer(sft)
    reward_model = freeze(load_reward_model(reward))
    ref = freeze(load_policy(sft))
    sampling = SamplingArgs(args.max_new_tokens, 1.0, 0)
    held_out = eval_prompts(task, args.n_eval_prompts)
    before = evaluate_policy(ref, tok, task, held_out, sampling, args.seed, reward_model, ref)
    n_prompts = args.iterations * args.batch_size // args.num_generations
    # a trailing space: TRL scores prompt + completion as one string (as bench.py)
    prompts = [q + " " for q in task.sample_prompts(n_prompts, random.Random(args.seed + 17))]
    updates = args.ppo_epochs * (args.batch_size // args.mini_batch_size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = trl_args(  # quiet, offline, CPU, as the benchmark's
            trl.RLOOConfig, os.path.join(tmp, "out"), "cpu", args.seed,
            per_device_train_batch_size=args.mini_batch_size,
            gradient_accumulation_steps=1,
            steps_per_generation=args.batch_size // args.mini_batch_size,
            num_iterations=args.ppo_epochs, num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0,
            learning_rate=args.learning_rate, max_steps=args.iterations * updates,
            disable_dropout=True, max_grad_norm=1.0, beta=args.beta)
        trainer = trl.RLOOTrainer(model=sft, reward_funcs=reward_model, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tok, reward_processing_classes=tok)
        trainer.train()
        policy = trainer.model.eval()
    wall = time.perf_counter() - t0
    after = evaluate_policy(policy, tok, task, held_out, sampling, args.seed, reward_model, ref)
    summary = {"gold_reward_before": before["gold_reward"],
               "gold_reward_after": after["gold_reward"],
               "proxy_reward_before": before["proxy_reward"],
               "proxy_reward_after": after["proxy_reward"], "kl_to_ref": after["kl_to_ref"],
               "response_len": after["response_len"], "eos_frac": after["eos_frac"],
               "wall_s": wall, "config": vars(args), "trl": trl.__version__}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"trl RLOO beta {args.beta:g} seed {args.seed}: gold {before['gold_reward']:.3f} -> "
          f"{after['gold_reward']:.3f}, KL {after['kl_to_ref']:.2f}, {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
