"""Stage `ppo` as a script: `python scripts/ppo.py ...` or `accelerate launch scripts/ppo.py ...`.

Takes the same arguments as `rlhf-toy ppo` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
