"""Stage `dpo` as a script: `python scripts/dpo.py ...` or `accelerate launch scripts/dpo.py ...`.

Takes the same arguments as `rlhf-toy dpo` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
