"""Stage `prefs` as a script: `python scripts/prefs.py ...` or `accelerate launch scripts/prefs.py ...`.

Takes the same arguments as `rlhf-toy prefs` (see `--help`).
"""

import sys

from rlhf_toy.cli import main

if __name__ == "__main__":
    sys.exit(main(["prefs", *sys.argv[1:]]))
