"""LoRA adapters (peft) and activation checkpointing: every peft call of the project.

A stage with `--use_peft` trains low-rank adapters on a frozen base model (Hu et al. 2021:
W x + (alpha / r) B A x, B starting at zero). The reference of DPO and of the on-policy
stages is then the same model with its adapter disabled (`reference_model`): one copy of
the base weights in memory, not two.

An adapter directory (a stage's output or a `checkpoint-N/`) holds peft's
`adapter_config.json` and `adapter_model.safetensors`, the base model's `config.json`
(so that context and vocabulary checks read it as for a full checkpoint), and
`base_model.json`: where the base lives, as a path relative to the adapter directory
(moving a whole run directory keeps it valid) and as an absolute path (moving the stage
directory alone keeps that one valid). `load_adapter_model` loads base + adapter and
merges them, so every tool (`inspect`, `compare`, the next stage) sees a plain model.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from rlhf_toy.errors import UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "base_model.json"
# the modules adapted when --lora_target_modules is not given, by the model's `model_type`
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def holds_adapter(path: str) -> bool:
    """Whether the checkpoint directory `path` holds a LoRA adapter."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The names of the layers to adapt: `names`, or the default of the model's type.

    Raises:
        UsageError: no default for this model type, or a name that is no linear layer of it.
    """
    model_type = getattr(model.config, "model_type", "?")
    names = list(names) or DEFAULT_TARGETS.get(model_type, [])
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, Conv1D))})
    if not names:
        raise UsageError(f"lora_target_modules must be given for a {model_type!r} model: some "
                         f"of {', '.join(linear)}")
    for name in names:
        if name not in linear:
            raise UsageError(f"lora_target_modules must name linear layers of the {model_type} "
                             f"model ({', '.join(linear)}) (got {name!r})")
    return names


def apply_lora(model: PreTrainedModel, cfg: Any, base_dir: str,
               modules_to_save: list[str] | None = None) -> nn.Module:
    """`model` with LoRA adapters on `cfg.lora_target_modules` (a `PeftModel`; its base
    frozen), or `model` itself without `cfg.use_peft`.

    Args:
        base_dir: the checkpoint `model` was loaded from (recorded with every save).
        modules_to_save: modules trained in full beside the adapters (the reward model's
            score head).
    """
    if not cfg.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=target_modules(model, cfg.lora_target_modules),
                        modules_to_save=modules_to_save,
                        # GPT-2's Conv1D stores its weight transposed
                        fan_in_fan_out=model.config.model_type == "gpt2")
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    # after get_peft_model, which sets it to the model's own `name_or_path`
    peft_model.peft_config["default"].base_model_name_or_path = os.path.abspath(base_dir)
    return peft_model


def enable_checkpointing(model: nn.Module, cfg: Any) -> None:
    """With `cfg.gradient_checkpointing`, recompute the activations of every transformers
    model inside `model` in the backward pass instead of keeping them (non-reentrant, so
    a frozen base with trainable adapters needs no input gradients)."""
    if not cfg.gradient_checkpointing:
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.activation_checkpointing_enable({"use_reentrant": False})


class AdapterDisabled(nn.Module):
    """The base model of a `PeftModel` as a model of its own: each forward runs the shared
    weights with the adapter disabled. It holds no parameters (the `PeftModel` is kept
    outside the module tree), so freezing or moving it leaves the policy alone."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule

    @property
    def config(self):
        return self.peft_model.config

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def reference_model(policy: nn.Module, load: Callable[[], nn.Module]) -> nn.Module:
    """The frozen reference: the adapted `policy` with its adapter disabled, or (a policy
    without adapters) `load()`, a second copy loaded from the base checkpoint."""
    peft_model = find_peft_model(policy)
    if peft_model is not None:
        return AdapterDisabled(peft_model)
    model = load()
    model.eval()
    model.requires_grad_(False)
    return model


def find_peft_model(model: nn.Module) -> nn.Module | None:
    """The `PeftModel` inside `model` (itself, or a policy of an actor-critic), or None."""
    if "peft" not in sys.modules:  # never imported (or not installed): no adapters anywhere
        return None
    from peft import PeftModel

    return next((m for m in model.modules() if isinstance(m, PeftModel)), None)


def save_adapter_extras(model: nn.Module, path: str) -> None:
    """Beside an adapter `save_pretrained` wrote into `path`: the base's `config.json` and
    `base_model.json` (relative and absolute path of the base). Nothing without adapters."""
    peft_model = find_peft_model(model)
    if peft_model is None:
        return
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]  # as save_pretrained writes it
    config.save_pretrained(path)
    base_dir = peft_model.peft_config["default"].base_model_name_or_path
    with open(os.path.join(path, BASE_FILE), "w") as fh:
        json.dump({"relative": os.path.relpath(base_dir, os.path.abspath(path)),
                   "absolute": base_dir}, fh, indent=1)


def adapter_base(path: str, what: str) -> str:
    """The base checkpoint of the adapter in `path`: its relative path if it resolves, else
    its absolute one; a one-line error when neither exists."""
    from rlhf_toy.integrity import read_json_file

    record = read_json_file(os.path.join(path, BASE_FILE), what)
    relative = os.path.normpath(os.path.join(path, record.get("relative", "")))
    for base in (relative, record.get("absolute", "")):
        if base and os.path.isdir(base):
            return base
    raise UsageError(f"{what} holds a LoRA adapter whose base model is missing (looked for "
                     f"{relative!r} and {record.get('absolute')!r})")


def load_adapter_model(path: str, kind: str, load_base: Callable[[str], nn.Module]) -> nn.Module:
    """Base (`load_base(base_dir)`) + the adapter in `path`, merged into a plain model."""
    from peft import PeftModel

    what = f"{kind} checkpoint {path!r}"
    base = load_base(adapter_base(path, what))
    try:
        model = PeftModel.from_pretrained(base, path, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UsageError(f"{what}: its LoRA adapter cannot be loaded ({type(exc).__name__})") \
            from None
    return model.merge_and_unload()


def load_adapter_weights(model: nn.Module, path: str, what: str) -> None:
    """Load the adapter weights (and fully trained modules) saved in `path` into the live
    `PeftModel` inside `model`, in place (resuming a run).

    Raises:
        UsageError: `model` has no adapters, or the saved ones do not fit them.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = find_peft_model(model)
    if peft_model is None:
        raise UsageError(f"{what} holds a LoRA adapter: resume with --use_peft")
    weights = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:
        raise UsageError(f"{what} holds adapter weights of another shape than this run's "
                         f"(lora_r or target modules?): {str(exc).splitlines()[0]}") from None
    if result.unexpected_keys:
        raise UsageError(f"{what} holds adapter weights this run's model does not have "
                         f"(e.g. {result.unexpected_keys[0]})")

