"""What the two-process tests (DDP, FSDP) share: the worker's entry point and the check that
the multi-process update equals one process on the combined batch."""

from __future__ import annotations

import os
import sys

import torch


def assert_updates_match(multi: dict, single: dict, init: dict) -> None:
    """Every PPO and DPO weight of the multi-process run equals the one-process run's (to float
    tolerance), and the update really moved the policy away from `init`."""
    for stage in ("ppo", "dpo"):
        assert multi[stage].keys() == single[stage].keys()
        moved = 0.0
        for name, w in single[stage].items():
            assert torch.allclose(multi[stage][name], w, atol=1e-6, rtol=1e-5), (stage, name)
            key = name.removeprefix("policy.")
            if key in init:
                moved = max(moved, (w - init[key]).abs().max().item())
        assert moved > 1e-3, f"{stage}: the update did not move the weights"


def worker_main(updated_weights, launch_hint: str, **kwargs) -> None:
    """A launched process: run `updated_weights(accelerator, **kwargs)`, save rank 0's result
    to `sys.argv[1]/weights.pt`, and tear the process group down before exit (gloo's threads
    otherwise may still run at interpreter shutdown, which can abort a process: "terminate
    called without an active exception")."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, launch_hint
    weights = updated_weights(accelerator, **kwargs)
    if accelerator.is_main_process:
        torch.save(weights, os.path.join(sys.argv[1], "weights.pt"))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
