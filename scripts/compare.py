"""Stage `compare` as a script: `python scripts/compare.py ...` (or under `accelerate launch`).

Takes the same arguments as `rlhf-toy compare` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
