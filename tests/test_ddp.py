"""Data parallel: 2 processes on half a batch each make the same update as 1 process on all of it.

`accelerate launch --multi_gpu --num_processes 2 tests/test_ddp.py OUT` runs this file as
a script on CPU: each process takes its half of one PPO batch and its DPO pairs (chosen the way
`run_dpo` chooses them), runs the PPO `update` (2 epochs, one minibatch each) and one DPO
step through a DDP-wrapped model (gloo), and rank 0 saves the weights. The test repeats
the same update in a single process on the combined batch and compares.

SGD, not AdamW, keeps the comparison linear in the gradient (Adam's first step is
about lr * sign(g), which turns float noise in tiny gradients into lr-sized gaps); the
gradients are what DDP averages, any optimizer then sees the same ones. Responses have
full masks so both halves hold the same number of tokens: PPO's losses are token means
per process, and DDP averages those means (equal to the combined token mean only when
the token counts agree).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial

import torch
from distributed_common import assert_updates_match, worker_main

from rlhf_toy.core import PREFERENCE_LOSSES, logprobs_from_logits
from rlhf_toy.models import PolicyWithValueHead, build_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer
from rlhf_toy.train.common import batch_indices
from rlhf_toy.train.onpolicy import Rollout, update
from rlhf_toy.train.ppo import PPO, PPOConfig

ROWS = 8  # PPO rollouts and DPO pairs per process
N_PAIRS = 32  # DPO pairs in the split (a multiple of 2 * ROWS: same epochs either way)
LR = 0.1


def _tokenizer():
    return build_tokenizer(get_task("sentiment").words)


def ppo_batch(tok, n: int) -> Rollout:
    """A deterministic rollout batch of `n` rows with full masks (old log-probs from the model)."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(4, len(tok), (n, 3), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[::3, 0] = 0  # some left padding
    response_ids = torch.randint(4, len(tok), (n, 6), generator=g)
    mask = torch.ones(n, 6)
    torch.manual_seed(0)
    model = PolicyWithValueHead(build_policy(tok))
    with torch.no_grad():
        logits, values = model(prompt_ids, prompt_mask, response_ids, mask)
    logprobs = logprobs_from_logits(logits, response_ids)
    randn = [torch.randn(n, 6, generator=g) for _ in range(3)]
    scores = torch.randn(n, generator=g)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, logprobs + 0.1 * randn[0],
                   logprobs, scores=scores, rewards=randn[1], advantages=randn[2],
                   values=values, returns=randn[1] + values, raw_scores=scores)


def dpo_data(tok):
    """`N_PAIRS` tokenized preference pairs with stand-in reference log-probs."""
    from rlhf_toy.data import tokenize_pairs
    from rlhf_toy.train.dpo import PreferenceTensors

    task, rng = get_task("sentiment"), __import__("random").Random(0)
    prompts = task.sample_prompts(N_PAIRS, rng)
    chosen = tokenize_pairs(tok, prompts, [task.sample_response(p, rng) for p in prompts])
    rejected = tokenize_pairs(tok, prompts, [task.sample_response(p, rng) for p in prompts])
    g = torch.Generator().manual_seed(2)
    return PreferenceTensors(chosen, rejected, -20 + torch.randn(N_PAIRS, generator=g),
                             -20 + torch.randn(N_PAIRS, generator=g))


def dpo_indices(acc, step: int, seed: int = 0) -> torch.Tensor:
    """This process's pairs at optimizer `step` (0-based), as `run_dpo` draws them."""
    draw = step * acc.num_processes + acc.process_index
    return batch_indices(N_PAIRS, ROWS, draw, seed) if acc.num_processes > 1 \
        else batch_indices(N_PAIRS, ROWS * 2, step, seed)


def dpo_two_steps(acc, policy, opt, data, tok) -> None:
    """Two sigmoid-DPO optimizer steps of `policy` on this process's pairs (`dpo_indices`),
    with gradient clipping at 1, as `run_dpo` takes them."""
    from rlhf_toy.train.dpo import batch_loss

    policy.train()
    for step in range(2):
        value, _ = batch_loss(policy, data, dpo_indices(acc, step),
                              partial(PREFERENCE_LOSSES["sigmoid"], beta=0.5), tok.pad_token_id)
        acc.backward(value)
        acc.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def ppo_share(acc):
    """(tokenizer, this process's share of the PPO batch, its config, a fresh seeded
    actor-critic): what every process starts its update from."""
    tok = _tokenizer()
    rank, world = acc.process_index, acc.num_processes
    rows = 2 * ROWS // world
    batch = ppo_batch(tok, 2 * ROWS).select(torch.arange(rank * rows, (rank + 1) * rows))
    cfg = PPOConfig(output_dir="unused", batch_size=rows, mini_batch_size=rows, ppo_epochs=2,
                    vf_coef=0.5, ent_coef=0.01, max_grad_norm=1.0)
    torch.manual_seed(0)
    return tok, batch, cfg, PolicyWithValueHead(build_policy(tok))


def updated_weights(acc) -> dict[str, dict[str, torch.Tensor]]:
    """One PPO update and one DPO step on this process's share; the resulting weights."""

    tok, batch, cfg, model = ppo_share(acc)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    model.train()
    update(PPO, model, opt, acc, batch, cfg, cfg.beta, torch.Generator().manual_seed(0))
    out = {"ppo": acc.unwrap_model(model).state_dict()}

    data = dpo_data(tok)
    torch.manual_seed(0)
    policy = build_policy(tok)
    policy, opt = acc.prepare(policy, torch.optim.SGD(policy.parameters(), lr=LR))
    dpo_two_steps(acc, policy, opt, data, tok)
    out["dpo"] = acc.unwrap_model(policy).state_dict()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dpo_draws_of_two_processes_cover_the_single_process_batch():
    class Acc:
        def __init__(self, rank, world):
            self.process_index, self.num_processes = rank, world

    for step in range(5):
        union = torch.cat([dpo_indices(Acc(r, 2), step) for r in range(2)])
        assert torch.equal(union.sort().values, dpo_indices(Acc(0, 1), step).sort().values)


def test_two_process_ddp_update_equals_single_process_on_combined_batch(tmp_path):
    from accelerate import Accelerator

    # PYTHONPATH: the launched script must import this checkout's rlhf_toy, not an installed one
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # `--cpu` would make accelerate 1.x fall back to its one-process launcher; `--multi_gpu`
    # starts torchrun, and `Accelerator(cpu=True)` in the script then picks gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "weights.pt", weights_only=True)
    single = updated_weights(Accelerator(cpu=True))
    torch.manual_seed(0)
    init = build_policy(_tokenizer()).state_dict()
    assert_updates_match(ddp, single, init)


if __name__ == "__main__":
    worker_main(updated_weights, "launch with accelerate launch --num_processes 2")
