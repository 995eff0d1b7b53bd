"""Speed benchmark of rlhf_toy against transformers' generate and TRL (see rlhf_toy/bench.py).

    python scripts/bench.py [--device cpu|cuda] [--size tiny|small|medium|gpt2] [--json FILE]
"""

import argparse
import sys

from rlhf_toy.bench import ROWS, SIZES, default_rows, run_bench
from rlhf_toy.bench_common import format_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--json", default="", help="write the result table as JSON here")
    parser.add_argument("--rows", default="",
                        help=f"comma-separated subset of {','.join(ROWS)} (default: every row; "
                             f"gpt2: {','.join(SIZES['gpt2'].rows)})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed A/B pairs per row (default: per size)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed A/B pairs before timing (default: per size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the MFU denominator (default: the FLOP/s of a large matmul timed "
                             "at the start, which on a shared CPU moves with the load)")
    args = parser.parse_args(argv)
    rows = tuple(r for r in args.rows.split(",") if r) or default_rows(args.size)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be > 0 (got {args.peak_tflops})")
    result = run_bench(args.device, args.size, rows, args.repeats, args.warmup, args.seed,
                       peak_tflops=args.peak_tflops)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
