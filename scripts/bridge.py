"""Every method (the real trainers) on an enumerable task, against the exact KL-regularized optimum.

    python scripts/bridge.py                      # defaults: every method, about 30 s of CPU
    python scripts/bridge.py --methods "ppo dpo"  # a subset
    python scripts/bridge.py --ppo_steps 120 --dpo_steps 400 --dpo_pairs 8000   # longer run

Every field of `rlhf_toy.bridge.BridgeConfig` is an option (`--help`). Prints the table of
exact numbers and writes them, with the per-step gap curves, to `--out` (JSON).
See `rlhf_toy/bridge.py` for how the numbers are computed and `rlhf_toy/bridge_methods.py`
for what each method is trained on and measured against.
"""

import argparse
import dataclasses
import json
import os

from rlhf_toy.bridge import BridgeConfig, format_table, run_bridge
from rlhf_toy.train.common import write_json


def parse_args(argv=None) -> tuple[BridgeConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(BridgeConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    parser.add_argument("--out", default="runs/bridge/summary.json", help="JSON summary path")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return BridgeConfig(**args), out


def main(argv=None) -> dict:
    cfg, out = parse_args(argv)
    result = run_bridge(cfg)
    print(format_table(result))
    print("wall seconds: " + json.dumps({k: round(v, 1) for k, v in result["wall_s"].items()}))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
