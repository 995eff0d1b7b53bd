"""One process, several stages: each stage gets the mixed precision it asks for."""

from types import SimpleNamespace

from rlhf_toy.train.common import make_accelerator


def test_stages_with_different_mixed_precision_in_one_process():
    # a pipeline with configs/gpu runs bf16 stages next to fp32 ones in one process
    first = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="bf16", seed=0))
    assert first.mixed_precision == "bf16"
    second = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="no", seed=0))
    assert second.mixed_precision == "no"
    third = make_accelerator(SimpleNamespace(device="cpu", mixed_precision="bf16", seed=0,
                                             gradient_accumulation_steps=2))
    assert third.mixed_precision == "bf16" and third.gradient_accumulation_steps == 2
