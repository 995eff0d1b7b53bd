"""TRL's DPOTrainer on the pairs `rlhf-toy prefs` wrote, as they are and with the leading
space of every response taken off: held-out implicit-reward accuracy of each (TRL counts
ties as wrong). Our dpo stage's defaults: beta 0.5, learning rate 3e-4 decaying linearly,
300 steps of 32 pairs, fp32 on CPU.

    python scripts/trl_dpo_prefs.py --prefs_dir runs/a/prefs --sft_dir runs/a/sft
"""

import argparse
import copy
import sys

from datasets import load_from_disk

from rlhf_toy.models import load_policy
from rlhf_toy.tokenizer import load_tokenizer


def held_out_accuracy(prefs, sft_dir: str, strip: bool, seed: int) -> float:
    """TRL DPOTrainer trained on `prefs["train"]`, evaluated on `prefs["test"]`."""
    from trl import DPOConfig, DPOTrainer

    def fix(row):
        return {k: row[k].lstrip(" ") if strip else row[k] for k in ("chosen", "rejected")}

    data = {s: prefs[s].select_columns(["prompt", "chosen", "rejected"]).map(fix)
            for s in ("train", "test")}
    model = load_policy(sft_dir)
    args = DPOConfig(output_dir="/tmp/trl_dpo_prefs", use_cpu=True, bf16=False,
                     activation_checkpointing=False, beta=0.5, learning_rate=3e-4,
                     max_steps=300, per_device_train_batch_size=32,
                     per_device_eval_batch_size=256, report_to=[], save_strategy="no",
                     logging_steps=1000, seed=seed)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=data["train"], eval_dataset=data["test"],
                         processing_class=load_tokenizer(sft_dir))
    trainer.train()
    return trainer.evaluate()["eval_rewards/accuracies"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefs_dir", required=True)
    parser.add_argument("--sft_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prefs = load_from_disk(args.prefs_dir)
    for strip in (False, True):
        accuracy = held_out_accuracy(prefs, args.sft_dir, strip, args.seed)
        print(f"{'without' if strip else 'with'} the leading space: held-out reward accuracy "
              f"{accuracy:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
