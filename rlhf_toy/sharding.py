"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`): shard a model,
sample from it, read its scalars.

Under FSDP2 every parameter is a `DTensor` holding 1/n of its rows on each of n processes;
a forward through the sharded module all-gathers each unit's weights just in time. The
sampler (`rollout.sample`) and evaluation call the policy's pieces directly, step by step,
outside that forward, so they sample from `sampling_policy(policy)`: a plain copy with the
full weights gathered once per rollout (the peak memory of unsharding the whole model).

accelerate's FSDP plugin (`configs/accelerate/fsdp.yaml`) produces the same DTensor
parameters on GPUs; on CPU accelerate ignores the plugin, so `shard_model` applies
`fully_shard` directly (one unit per `GPT2Block`, one per GPT-2 model, one for the root).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block


def _is_dtensor(x) -> bool:
    if not torch.distributed.is_available():  # builds without torch.distributed: no DTensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a sharded `DTensor` (FSDP2)."""
    return any(_is_dtensor(p) for p in module.parameters())


def plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """A `DTensor` (e.g. the gradient norm of a sharded model) as a full local tensor;
    anything else unchanged. A collective: every process must call it."""
    return x.full_tensor() if x is not None and _is_dtensor(x) else x


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Apply FSDP2 in place: one unit per `GPT2Block`, one per language model with an LM
    head inside `model` (the policy of `PolicyWithValueHead`), and `model` itself as the
    root. Call on every process, before building the optimizer.

    Args:
        model: e.g. `PolicyWithValueHead` or a `GPT2LMHeadModel`.
        mesh: a 1-D `DeviceMesh` over the processes (default: all of them, on the
            parameters' device type).
    Returns:
        `model` (now an `FSDPModule`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    units = [m for m in model.modules() if isinstance(m, GPT2Block)]
    # a language model with its head is one unit: its embedding and the LM head are one
    # tied tensor, which must not be split between units (so never GPT2Model on its own)
    units += [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)
              and m.get_output_embeddings() is not None]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    # the root too frees its gathered weights after each forward (FSDP2's default keeps
    # them): after a forward without backward (a rollout) the kept ones would take the next
    # backward's gradients away from the sharded parameters, which then never change
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every `DTensor` gathered to its full value (collective)."""
    return {k: plain(v.detach()) for k, v in module.state_dict().items()}


@contextlib.contextmanager
def sampling_policy(policy: nn.Module) -> Iterator[nn.Module]:
    """The policy to sample from: `policy` itself when it holds full weights (one process,
    DDP, ZeRO-1/2), else a plain copy of its class with the full weights gathered (FSDP2),
    discarded on exit. Every process must enter it (the gather is a collective).

    Args:
        policy: a transformers causal LM, plain or sharded by `shard_model` / accelerate.
    """
    if not is_sharded(policy):
        yield policy
        return
    weights = full_state_dict(policy)
    # FSDP2 swaps the class for a subclass `FSDP<Name>`: rebuild the model's own class
    base = next(c for c in type(policy).__mro__ if issubclass(c, PreTrainedModel)
                and not c.__name__.startswith("FSDP"))
    with torch.device("meta"):
        full = base(copy.deepcopy(policy.config))
    full.load_state_dict(weights, assign=True)
    full.tie_weights()
    full.train(policy.training)
    full.requires_grad_(False)
    try:
        yield full
    finally:
        del full, weights
