"""Shared fixtures: offline hub settings and a tiny trained pipeline reused across tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

# rlhf_toy's environment defaults (the OpenMP spin count) must be set before torch loads
import rlhf_toy  # noqa: E402,F401

# isort: split
import torch  # noqa: E402

torch.set_num_threads(2)

# A minimal configuration of every stage: seconds, not minutes.
TINY = {
    "sft": ["--max_steps", "120", "--n_train", "1000", "--n_eval", "64", "--n_eval_prompts", "64"],
    "prefs": ["--n_pairs", "1000", "--n_eval_prompts", "64"],
    "reward": ["--max_steps", "60", "--batch_size", "32"],
    "ppo": ["--max_steps", "4", "--batch_size", "16", "--mini_batch_size", "8",
            "--n_eval_prompts", "32"],
}
for _stage in ("grpo", "rloo", "reinforce_pp"):  # the other on-policy stages: PPO's settings
    TINY[_stage] = TINY["ppo"]


def run_stage(stage: str, out: str, *extra: str, task: str = "sentiment") -> dict:
    """Run one stage through the CLI parser with the tiny settings; returns its summary."""
    from rlhf_toy.cli import STAGE_INPUTS, _stages
    from rlhf_toy.config import parse_config

    cls, runner, _ = _stages()[stage]
    argv = ["--output_dir", os.path.join(out, stage), "--task", task, "--device", "cpu",
            *TINY.get(stage, [])]
    fields = cls.__dataclass_fields__
    for name, source in STAGE_INPUTS.items():
        if name in fields:
            argv += [f"--{name}", os.path.join(out, source)]
    return runner(parse_config(cls, argv + list(extra)))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """sft -> prefs -> reward on the default task, once per test session."""
    out = str(tmp_path_factory.mktemp("tiny_run"))
    summaries = {stage: run_stage(stage, out) for stage in ("sft", "prefs", "reward")}
    return out, summaries
