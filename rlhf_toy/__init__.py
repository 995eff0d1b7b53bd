"""rlhf_toy: a small, real RLHF framework (tiny GPT, reward model, PPO, DPO)."""

import os

# Nothing in this package downloads weights or data: every model starts from a
# config and every dataset is generated. Make the hub libraries agree.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
              "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_name, "false" if _name == "TOKENIZERS_PARALLELISM" else "1")

# PyTorch's CPU threads (its bundled GNU OpenMP): spin up to libgomp's documented 300 000
# iterations (about 3 ms) for the next parallel region before sleeping. Left unset, the
# second thread of a 2-core machine here slept between the small ops of a tiny model and
# waking it cost more than the op: the default PPO stage took 18.2 s instead of 8.1 s,
# with the same numbers (README, "Speed"). libgomp reads it when torch loads: it applies
# where rlhf_toy is imported first (the CLI, the scripts, the tests) and to subprocesses.
os.environ.setdefault("GOMP_SPINCOUNT", "300000")

__version__ = "0.1.0"
