"""Stage `sft` as a script: `python scripts/sft.py ...` or `accelerate launch scripts/sft.py ...`.

Takes the same arguments as `rlhf-toy sft` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
