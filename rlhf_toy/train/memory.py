"""Refuse a run that cannot fit in memory, before it allocates anything.

The estimate is a lower bound built from the config alone: model parameters (with
gradients and AdamW's two moments when trained), the largest forward's logits and
activations (batch x length x vocabulary), and the examples held in memory (datasets,
evaluation prompts, sampled responses). It only has to catch sizes that are off by orders
of magnitude (`--n_train 1000000000`), so every term is rounded down.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from rlhf_toy.errors import UsageError

GIB = 1024**3
EXAMPLE_BYTES = 200  # a generated example as python strings, at least
FLOAT = 4


def model_shape(cfg: Any) -> dict[str, int]:
    """n_layer, n_embd, n_positions and vocab_size of the run's model: from the config
    (sft) or the `config.json` of the checkpoint it starts from."""
    if hasattr(cfg, "n_layer"):
        return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_positions": cfg.n_positions,
                "vocab_size": 64}
    path = getattr(cfg, "sft_dir", "") or getattr(cfg, "checkpoint", "")
    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
        return {k: int(config[k]) for k in ("n_layer", "n_embd", "n_positions", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # loading the checkpoint reports it


def estimate(cfg: Any, stage: str) -> list[tuple[int, str, str]]:
    """The run's memory by part: (bytes, what, the field that sets it)."""
    shape = model_shape(cfg)
    if not shape:
        return []
    n_layer, n_embd = shape["n_layer"], shape["n_embd"]
    length, vocab = shape["n_positions"], shape["vocab_size"]
    params = n_layer * 12 * n_embd**2 + (vocab + length) * n_embd
    models = {"sft": 4, "reward": 4, "ppo": 7, "dpo": 6, "prefs": 1, "compare": 3,
              "inspect": 3}.get(stage, 1)  # copies: trained (x4 with AdamW state) + frozen
    if getattr(cfg, "use_peft", False):  # LoRA: one frozen base (the reference too), + reward
        models = {"ppo": 2, "dpo": 2}.get(stage, 1)
    parts = [(models * params * FLOAT, f"a model of {params:,} parameters",
              "n_layer, n_embd or n_positions" if stage == "sft" else "the model's size")]
    rows = {"sft": cfg_get(cfg, "batch_size"), "reward": 2 * cfg_get(cfg, "batch_size"),
            "dpo": 2 * cfg_get(cfg, "batch_size"), "ppo": cfg_get(cfg, "batch_size"),
            "inspect": cfg_get(cfg, "n")}.get(stage, 0)
    per_row = length * (3 * vocab + 16 * n_layer * n_embd + length) * FLOAT
    if rows:
        field = "n" if stage == "inspect" else "batch_size"
        parts.append((rows * per_row, f"a batch of {rows:,} sequences", field))
    per_example = EXAMPLE_BYTES + 4 * length * 8
    for field in ("n_train", "n_eval", "n_pairs", "n_eval_prompts", "n"):
        n = cfg_get(cfg, field)
        if n:
            parts.append((n * per_example, f"{n:,} examples", field))
    return parts


def cfg_get(cfg: Any, name: str) -> int:
    value = getattr(cfg, name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def available_bytes(device: str) -> int:
    """Memory this process can still use: free GPU memory when it runs on CUDA, else the
    host's available memory (psutil, or /proc/meminfo); 0 if unknown."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def check_memory(cfg: Any, stage: str) -> None:
    """`UsageError` when the run's estimated memory exceeds what is available."""
    parts = estimate(cfg, stage)
    need = sum(b for b, _, _ in parts)
    have = available_bytes(getattr(cfg, "device", "cpu"))
    if not parts or not have or need <= have:
        return
    size, what, field = max(parts)
    raise UsageError(f"this run needs at least {need / GIB:.1f} GiB of memory ({what}: "
                     f"{size / GIB:.1f} GiB) but {have / GIB:.1f} GiB is available; "
                     f"lower {field}")
