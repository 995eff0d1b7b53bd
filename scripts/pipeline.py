"""Stage `pipeline` as a script: `python scripts/pipeline.py ...` or `accelerate launch scripts/pipeline.py ...`.

Takes the same arguments as `rlhf-toy pipeline` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
