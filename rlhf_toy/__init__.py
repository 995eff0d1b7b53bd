"""rlhf_toy: a small, real RLHF framework (tiny GPT, reward model, PPO, DPO)."""

import os

# Nothing in this package downloads weights or data: every model starts from a
# config and every dataset is generated. Make the hub libraries agree.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
              "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_name, "false" if _name == "TOKENIZERS_PARALLELISM" else "1")

__version__ = "0.1.0"
