"""Peak memory of a DPO step and a PPO iteration at the `gpt2` size, with and without LoRA
and gradient checkpointing (README, "LoRA and gradient checkpointing").

    python scripts/memory_lora.py [--workdir DIR] [--dpo_batch 32] [--ppo_batch 32]

The `gpt2` size: 12 layers, 768 wide, 12 heads, n_positions 256, random init, the
sentiment task's tokenizer. Once, in `--workdir`: that model saved as the SFT checkpoint,
a prefs run from it and its reward model. Then each setting runs the real stage
(`rlhf-toy dpo` / `rlhf-toy ppo`, one step / iteration) in a fresh subprocess, which
reports its peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): the
weights, the reference, the optimizer state, the activations and everything the process
imported. The CPU build of torch; numbers in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SIZE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 256}
SETTINGS = [("full", []), ("full + ckpt", ["--gradient_checkpointing"]),
            ("LoRA r=16", ["--use_peft"]),
            ("LoRA r=16 + ckpt", ["--use_peft", "--gradient_checkpointing"])]

CHILD = """
import json, resource, sys
from rlhf_toy.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def setup(workdir: str) -> None:
    """The gpt2-size SFT checkpoint (random init), 256 preference pairs, a reward model."""
    from rlhf_toy.cli import main
    from rlhf_toy.models import build_policy, reward_model_from_policy
    from rlhf_toy.tasks import get_task
    from rlhf_toy.tokenizer import build_tokenizer

    sft = os.path.join(workdir, "sft")
    if not os.path.isdir(sft):
        tokenizer = build_tokenizer(get_task("sentiment").words)
        build_policy(tokenizer, **SIZE).save_pretrained(sft)
        tokenizer.save_pretrained(sft)
    prefs = os.path.join(workdir, "prefs")
    if not os.path.isdir(prefs):
        main(["prefs", "--sft_dir", sft, "--output_dir", prefs, "--n_pairs", "256",
              "--n_eval_prompts", "8"])
    reward = os.path.join(workdir, "reward")
    if not os.path.isdir(reward):
        reward_model_from_policy(sft, 0.02).save_pretrained(reward)


def measure(workdir: str, stage: str, extra: list[str]) -> float:
    """Peak RSS (MiB) of one run of `stage` in a fresh process."""
    out = tempfile.mkdtemp(dir=workdir, prefix=f"{stage}-")
    argv = [stage, "--sft_dir", os.path.join(workdir, "sft"), "--output_dir", out,
            "--reward_dir", os.path.join(workdir, "reward"), "--max_steps", "1",
            "--n_eval_prompts", "8", "--device", "cpu", *extra]
    if stage == "dpo":
        argv += ["--prefs_dir", os.path.join(workdir, "prefs")]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                          check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(done.stderr[-2000:])
    return result["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/memory_lora")
    parser.add_argument("--dpo_batch", type=int, default=32, help="pairs per DPO step")
    parser.add_argument("--ppo_batch", type=int, default=32, help="rollouts per PPO iteration")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    setup(args.workdir)
    stages = {"dpo": ["--batch_size", str(args.dpo_batch)],
              "ppo": ["--batch_size", str(args.ppo_batch), "--mini_batch_size",
                      str(args.ppo_batch), "--ppo_epochs", "1"]}
    print("| setting | DPO step peak RSS (MiB) | PPO iteration peak RSS (MiB) |")
    print("|---|---|---|")
    for name, extra in SETTINGS:
        peaks = [measure(args.workdir, stage, stage_args + extra)
                 for stage, stage_args in stages.items()]
        print(f"| {name} | {peaks[0]:.0f} | {peaks[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
