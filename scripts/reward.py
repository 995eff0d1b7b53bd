"""Stage `reward` as a script: `python scripts/reward.py ...` or `accelerate launch scripts/reward.py ...`.

Takes the same arguments as `rlhf-toy reward` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", *sys.argv[1:]]))
