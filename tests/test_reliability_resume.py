"""Interrupted runs lose nothing: N steps == N/2 steps, stop, resume to N, bit for bit (CPU).

Each test trains a reference run straight through, then the same run stopped right after
its checkpoint at N/2 (an exception raised from the checkpoint hook, or SIGKILL for the
subprocess test) and resumed with `--resume_from_checkpoint latest`. Every parameter is
compared with `torch.equal`, and the whole `metrics.jsonl` with `==`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, run_stage
from safetensors.torch import load_file

from rlhf_toy.errors import UsageError
from rlhf_toy.train import checkpoint
from rlhf_toy.train.checkpoint import TRAINER_STATE, list_checkpoints

DPO_TINY = ["--max_steps", "4", "--batch_size", "16", "--n_eval_prompts", "8",
            "--eval_steps", "2", "--logging_steps", "1"]
PPO_TINY = ["--max_steps", "4", "--batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs",
            "2", "--n_eval_prompts", "8", "--logging_steps", "1", "--eval_steps", "2"]


def small_prefs(root: str, out: str, n_train: int = 64, n_test: int = 16) -> str:
    """The first pairs of the tiny run's preference dataset: DPO runs in seconds."""
    from datasets import DatasetDict, load_from_disk

    prefs = load_from_disk(os.path.join(root, "prefs"))
    DatasetDict(train=prefs["train"].select(range(n_train)),
                test=prefs["test"].select(range(n_test))).save_to_disk(out)
    return out


class Stop(Exception):
    """Raised by the patched checkpoint hook: the run 'dies' right after a checkpoint."""


def _stop_after_checkpoint(monkeypatch, step: int) -> None:
    save = checkpoint.save_checkpoint

    def save_then_stop(output_dir, at, model, state):
        path = save(output_dir, at, model, state)
        if at == step:
            raise Stop(path)
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)


def assert_same_run(a: str, b: str, files=("model.safetensors",)) -> None:
    """Identical weights (every tensor, `torch.equal`), metrics rows and summary."""
    for name in files:
        wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key}"
    with open(os.path.join(a, "metrics.jsonl")) as fa, open(os.path.join(b, "metrics.jsonl")) as fb:
        rows_a, rows_b = [json.loads(x) for x in fa], [json.loads(x) for x in fb]
    assert rows_a == rows_b
    summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (a, b)]
    for s in summaries:
        s.pop("wall_s")
    assert summaries[0] == summaries[1]


def _stopped_and_resumed(stage, root, out, extra, monkeypatch):
    with monkeypatch.context() as m:
        _stop_after_checkpoint(m, 2)
        with pytest.raises(Stop):
            run_stage(stage, root, "--output_dir", out, *extra, "--save_steps", "2")
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not os.path.exists(os.path.join(out, "summary.json"))  # it never finished
    run_stage(stage, root, "--output_dir", out, *extra, "--save_steps", "2",
              "--resume_from_checkpoint", "latest")


def test_ppo_resume_is_bit_exact(tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run_stage("ppo", root, "--output_dir", full, *PPO_TINY, "--adaptive_kl", "true")
    _stopped_and_resumed("ppo", root, resumed, [*PPO_TINY, "--adaptive_kl", "true"], monkeypatch)
    assert_same_run(full, resumed)
    head_a = torch.load(os.path.join(full, "value_head.pt"), weights_only=True)
    head_b = torch.load(os.path.join(resumed, "value_head.pt"), weights_only=True)
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    state = torch.load(os.path.join(resumed, "checkpoint-2", TRAINER_STATE), weights_only=True)
    assert {"optimizer", "rng", "kl_ctl", "before", "step"} <= set(state)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_dpo_resume_is_bit_exact(loss_type, tiny_run, tmp_path, monkeypatch):
    """Also for the reference-free SimPO loss, whose run caches no reference log-probs."""
    root, _ = tiny_run
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    extra = [*DPO_TINY, "--prefs_dir", small_prefs(root, str(tmp_path / "prefs")),
             "--loss_type", loss_type]
    run_stage("dpo", root, "--output_dir", full, *extra)
    _stopped_and_resumed("dpo", root, resumed, extra, monkeypatch)
    assert_same_run(full, resumed)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sft_and_reward_resume_is_bit_exact(stage, tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    extra = ["--max_steps", "4", "--batch_size", "16", "--logging_steps", "1"]
    if stage == "sft":
        extra += ["--n_train", "64", "--n_eval", "16", "--n_eval_prompts", "8"]
    else:
        extra += ["--prefs_dir", small_prefs(root, str(tmp_path / "prefs"))]
    run_stage(stage, root, "--output_dir", full, *extra)
    _stopped_and_resumed(stage, root, resumed, extra, monkeypatch)
    assert_same_run(full, resumed)


def test_resume_errors(tiny_run, tmp_path):
    root, _ = tiny_run
    out = str(tmp_path / "dpo")
    with pytest.raises(UsageError, match="'latest' found no checkpoint-N/"):
        run_stage("dpo", root, "--output_dir", out, *DPO_TINY, "--resume_from_checkpoint",
                  "latest")
    with pytest.raises(UsageError, match="does not exist"):
        run_stage("dpo", root, "--output_dir", out, *DPO_TINY, "--resume_from_checkpoint",
                  str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="not a resumable checkpoint"):
        run_stage("dpo", root, "--output_dir", out, *DPO_TINY, "--resume_from_checkpoint",
                  os.path.join(root, "sft"))


def test_atomic_save_replaces_and_cleans(tmp_path):
    """A save over an existing checkpoint replaces it whole; a killed save's temporary
    directory is never listed and is removed at the next start."""
    from rlhf_toy.models import build_policy
    from rlhf_toy.tasks import get_task
    from rlhf_toy.tokenizer import build_tokenizer

    model = build_policy(build_tokenizer(get_task("sentiment").words))
    out = str(tmp_path)
    checkpoint.save_checkpoint(out, 1, model, {"stage": "x"})
    os.makedirs(os.path.join(out, ".tmp-checkpoint-2-abc"))  # what a kill mid-save leaves
    checkpoint.save_checkpoint(out, 1, model, {"stage": "y"})
    assert [s for s, _ in list_checkpoints(out)] == [1]
    state = torch.load(os.path.join(out, "checkpoint-1", TRAINER_STATE), weights_only=True)
    assert state["stage"] == "y"
    checkpoint.clean_checkpoints(out)
    assert sorted(os.listdir(out)) == ["checkpoint-1"]


def _cli(root, out, *extra):
    argv = [sys.executable, "-m", "rlhf_toy.cli", "ppo", "--output_dir", out, "--device", "cpu",
            "--sft_dir", os.path.join(root, "sft"), "--reward_dir", os.path.join(root, "reward"),
            *TINY["ppo"], "--max_steps", "6", "--logging_steps", "1", "--save_steps", "1", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return argv, env


def test_sigkill_during_ppo_then_resume_latest(tiny_run, tmp_path):
    """SIGKILL a `rlhf-toy ppo` subprocess once its first checkpoint exists; `latest` resumes
    it to the same weights and metrics as a run that was never interrupted."""
    root, _ = tiny_run
    killed, full = str(tmp_path / "killed"), str(tmp_path / "full")
    argv, env = _cli(root, killed)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list_checkpoints(killed), "no checkpoint appeared"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    subprocess.run(_cli(root, killed, "--resume_from_checkpoint", "latest")[0], env=env,
                   check=True, capture_output=True)
    subprocess.run(_cli(root, full)[0], env=env, check=True, capture_output=True)
    shutil.rmtree(os.path.join(full, "checkpoint-1"), ignore_errors=True)
    assert_same_run(full, killed)


def test_checkpoint_of_another_stage_or_beyond_max_steps(tmp_path):
    from rlhf_toy.models import build_policy
    from rlhf_toy.tasks import get_task
    from rlhf_toy.tokenizer import build_tokenizer

    model = build_policy(build_tokenizer(get_task("sentiment").words))
    path = checkpoint.save_checkpoint(str(tmp_path), 3, model, {"stage": "dpo"})
    with pytest.raises(UsageError, match="is a 'dpo' checkpoint, not a 'ppo' one"):
        checkpoint.load_checkpoint(path, "ppo", 10)
    with pytest.raises(UsageError, match=r"max_steps must be >= the checkpoint's step 3 \(got 2\)"):
        checkpoint.load_checkpoint(path, "dpo", 2)
    assert checkpoint.resolve_checkpoint(str(tmp_path), "latest") == path
