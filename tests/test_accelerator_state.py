"""One process, several stages: each stage gets the mixed precision it asks for; our
gradient-clipping and optimizer-step helpers do what accelerate's wrappers do."""

from types import SimpleNamespace

import torch

from rlhf_toy.train.common import clip_grad_norm, make_accelerator, optimizer_step


def test_stages_with_different_mixed_precision_in_one_process():
    # a pipeline with configs/gpu runs bf16 stages next to fp32 ones in one process
    first = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="bf16", seed=0))
    assert first.mixed_precision == "bf16"
    second = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="no", seed=0))
    assert second.mixed_precision == "no"
    third = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="bf16", seed=0,
                                             gradient_accumulation_steps=2))
    assert third.mixed_precision == "bf16" and third.gradient_accumulation_steps == 2


def _train(steps: int, accumulation: int, ours: bool) -> tuple[list[torch.Tensor], list[int]]:
    """`steps` micro-batches of a small regression under accelerate's accumulation, with
    our helpers or accelerate's wrappers; the weights after, and the micro-batches after
    which the weights changed."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    acc = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="no", seed=0,
                                           gradient_accumulation_steps=accumulation))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model, optimizer = acc.prepare(model, optimizer)
    params = list(model.parameters())
    x, y = torch.randn(steps, 4, 8), torch.randn(steps, 4, 1)
    changed = []
    for i in range(steps):
        before = [p.detach().clone() for p in params]
        with acc.accumulate(model):
            acc.backward(((model(x[i]) - y[i]) ** 2).mean())
            if ours:
                if acc.sync_gradients:  # as the stages clip: once per accumulation cycle
                    clip_grad_norm(acc, params, 0.5)
                optimizer_step(acc, optimizer)
            else:
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 0.5)
                optimizer.step()
                optimizer.zero_grad()
        if any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)):
            changed.append(i)
    return [p.detach() for p in params], changed


def test_clip_and_step_helpers_equal_accelerates_wrappers_bit_for_bit():
    # clip_grad_norm / optimizer_step skip accelerate's per-call lookups in one process;
    # they must clip with the same norm and step only at the end of an accumulation cycle
    for accumulation in (1, 3):
        ours, ours_changed = _train(6, accumulation, ours=True)
        theirs, theirs_changed = _train(6, accumulation, ours=False)
        assert ours_changed == theirs_changed == list(range(accumulation - 1, 6, accumulation))
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
    # the clipping is real: the returned norm is the pre-clip norm, the gradient is cut to 0.5
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    acc = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="no", seed=0))
    assert clip_grad_norm(acc, [p], 0.5).item() == 5.0
    assert torch.allclose(p.grad, torch.tensor([0.3, 0.4, 0.0]), atol=1e-6)


def test_import_sets_the_openmp_spin_count_before_torch_loads_and_keeps_a_users():
    # libgomp reads GOMP_SPINCOUNT when torch loads: `import rlhf_toy` must come first and
    # set it only where the user has not (README, "Speed")
    import os
    import subprocess
    import sys

    code = ("import os, sys; import rlhf_toy; print(os.environ['GOMP_SPINCOUNT'], "
            "'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["300000", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "1000"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1000", "False"]
