"""Fully sharded (FSDP2): 2 processes holding half of every weight make the same update as
1 process with full weights on the combined batch, and sample the same responses.

`python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp.py OUT` runs this file
as a script on CPU (gloo): each process shards the model with `rlhf_toy.sharding.shard_model`
(FSDP2 `fully_shard`, one unit per GPT2Block, per GPT-2 model and the root: every parameter a
DTensor with half its rows here), then
1. collects a PPO rollout from the sharded model (`collect_rollout`, which samples from
   `sampling_policy`: the full weights gathered once),
2. runs `update` (2 epochs, one minibatch each) on its half of the PPO batch of
   `tests/test_ddp.py`, and two DPO steps on its DPO pairs,
and rank 0 saves the gathered weights and the rollout. The test repeats all of it in one
process with plain weights and compares (SGD and full masks, for the reasons given in
`tests/test_ddp.py`). accelerate ignores its FSDP plugin on CPU, so the scripts use
`fully_shard` directly; `Accelerator(cpu=True)` still supplies backward, clipping and the
process group.
"""

from __future__ import annotations

import os
import sys

import torch
from distributed_common import assert_updates_match, worker_main
from test_ddp import LR, _free_port, _tokenizer, dpo_data, dpo_two_steps, ppo_share
from transformers import GPT2ForSequenceClassification

from rlhf_toy.models import build_policy, freeze
from rlhf_toy.sharding import full_state_dict, is_sharded, shard_model
from rlhf_toy.train.onpolicy import collect_rollout, update
from rlhf_toy.train.ppo import PPO, PPOConfig

PROMPTS = ["the movie was", "the plot", "the", "the cast seemed"]
ROLLOUT_FIELDS = ("response_ids", "mask", "logprobs", "ref_logprobs", "values", "scores",
                  "rewards", "advantages", "returns")


def rollout(model, tok) -> dict[str, torch.Tensor]:
    """A seeded rollout of `PROMPTS` from `model` (frozen reference and reward model seeded)."""
    torch.manual_seed(5)
    ref = freeze(build_policy(tok))
    config = ref.config.__class__(**{**ref.config.to_dict(), "num_labels": 1})
    rm = freeze(GPT2ForSequenceClassification(config))
    cfg = PPOConfig(output_dir="unused", temperature=0.8, max_new_tokens=8)
    model.eval()
    batch = collect_rollout(PPO, model, ref, rm, tok, PROMPTS, cfg, cfg.beta,
                            torch.Generator().manual_seed(0))
    return {f: getattr(batch, f) for f in ROLLOUT_FIELDS}


def updated_weights(acc, sharded: bool) -> dict[str, dict]:
    """The rollout, one PPO update and two DPO steps on this process's share."""

    tok, batch, cfg, model = ppo_share(acc)
    if sharded:
        shard_model(model)
        assert is_sharded(model.policy)
    out = {"rollout": rollout(model, tok)}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    update(PPO, model, opt, acc, batch, cfg, cfg.beta, torch.Generator().manual_seed(0))
    out["ppo"] = full_state_dict(model)

    data = dpo_data(tok)
    torch.manual_seed(0)
    policy = build_policy(tok)
    if sharded:
        shard_model(policy)
    dpo_two_steps(acc, policy, torch.optim.SGD(policy.parameters(), lr=LR), data, tok)
    out["dpo"] = full_state_dict(policy)
    return out


def test_two_process_fsdp_update_and_sampling_equal_single_process(tmp_path):
    import subprocess

    from accelerate import Accelerator

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this rlhf_toy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fsdp = torch.load(tmp_path / "weights.pt", weights_only=True)
    single = updated_weights(Accelerator(cpu=True), sharded=False)
    for name in ("response_ids", "mask"):
        assert torch.equal(fsdp["rollout"][name], single["rollout"][name]), name
    for name in ROLLOUT_FIELDS[2:]:
        assert torch.allclose(fsdp["rollout"][name], single["rollout"][name], atol=1e-5), name
    torch.manual_seed(0)
    init = build_policy(_tokenizer()).state_dict()
    assert_updates_match(fsdp, single, init)


if __name__ == "__main__":
    worker_main(updated_weights, "launch with torch.distributed.run --nproc_per_node 2", sharded=True)
