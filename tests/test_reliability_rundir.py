"""An output directory never loses data: a finished run is not overwritten without
`--overwrite_output_dir`, a failed run leaves the earlier one as it was, two runs cannot
write into one directory, a full disk or a kill -9 mid-save leaves the previous checkpoint
whole, and a finished run can be continued to the same weights as a longer run."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_stage
from safetensors.torch import load_file
from test_reliability_resume import PPO_TINY, assert_same_run

from rlhf_toy.cli import main
from rlhf_toy.train import sft as sft_module
from rlhf_toy.train.checkpoint import list_checkpoints
from rlhf_toy.train.rundir import LOCK_FILE

SFT_TINY = ["--max_steps", "2", "--n_train", "64", "--n_eval", "16", "--n_eval_prompts", "8",
            "--batch_size", "16", "--logging_steps", "1", "--device", "cpu"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
       "OMP_NUM_THREADS": "2"}  # as conftest: the same sums in every process


def _snapshot(path) -> dict[str, bytes]:
    """Every file under `path` (the lock aside) and its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name != LOCK_FILE:
                full = os.path.join(root, name)
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, path)] = fh.read()
    return out


def _sft(out, *extra) -> int:
    return main(["sft", "--output_dir", str(out), *SFT_TINY, *extra])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("rlhf-toy: error: ") == 1, err
    return err[err.index("rlhf-toy: error: "):].strip()


def test_finished_run_is_kept_unless_overwritten(tmp_path, capsys, monkeypatch):
    """A rerun into a finished run is refused and changes no byte; a run that fails before
    producing anything changes no byte either, even with --overwrite_output_dir; a run that
    overwrites leaves nothing of the earlier one (no stale checkpoint-*)."""
    out = tmp_path / "sft"
    assert _sft(out, "--save_steps", "1") == 0
    before = _snapshot(out)
    assert {"checkpoint-1/trainer_state.pt", "checkpoint-2/trainer_state.pt", "summary.json",
            "run_config.json", "metrics.jsonl", "manifest.json"} <= set(before)
    assert _sft(out, "--learning_rate", "0.002") == 2
    assert "already holds a finished run; pass --overwrite_output_dir" in _err(capsys)
    assert _snapshot(out) == before

    def broken(*args):
        raise sft_module.UsageError("corpus unavailable")

    with monkeypatch.context() as m:  # fails after the checks, before any output
        m.setattr(sft_module, "sft_dataset", broken)
        assert _sft(out, "--overwrite_output_dir", "--learning_rate", "0.002") == 2
    assert _snapshot(out) == before

    assert _sft(out, "--overwrite_output_dir", "--learning_rate", "0.002") == 0
    after = _snapshot(out)
    assert not any(name.startswith("checkpoint-") for name in after)
    assert json.loads(after["run_config.json"])["learning_rate"] == 0.002
    assert [json.loads(r)["step"] for r in after["metrics.jsonl"].decode().splitlines()] == [1, 2, 2]
    assert not os.path.exists(out / LOCK_FILE)  # released at the end


def _sft_cli(out, *extra, limit_bytes=None):
    argv = [sys.executable, "-m", "rlhf_toy.cli", "sft", "--output_dir", str(out), *SFT_TINY,
            *extra]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit if limit_bytes else None)


def test_second_run_into_a_locked_dir_is_refused_and_a_killed_lock_does_not_stick(tmp_path,
                                                                                   capsys):
    out = tmp_path / "sft"
    proc = _sft_cli(out, "--max_steps", "100000", "--logging_steps", "1000")
    try:
        deadline = time.time() + 120
        lock = out / LOCK_FILE
        while not (lock.exists() and lock.read_text().strip()) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        assert _sft(out, "--overwrite_output_dir") == 2
        assert (f"output_dir {str(out)!r} is in use by another run (pid {proc.pid})"
                in _err(capsys))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert (out / LOCK_FILE).exists()  # the killed run's lock file stays, its lock does not
    assert _sft(out, "--overwrite_output_dir") == 0


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """`ulimit -f` below a checkpoint's size: the save fails with one line naming the
    checkpoint and the one kept; no temporary directory is left; resuming from the kept
    checkpoint ends with the weights of a run that never failed."""
    full, out = tmp_path / "full", tmp_path / "sft"
    assert _sft(full, "--max_steps", "4") == 0
    assert _sft(out, "--save_steps", "2") == 0  # finished at step 2, checkpoint-2 saved
    size = os.path.getsize(out / "checkpoint-2" / "trainer_state.pt")
    proc = _sft_cli(out, "--max_steps", "4", "--save_steps", "1", "--resume_from_checkpoint",
                    "latest", limit_bytes=size // 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"rlhf-toy: error: saving {out / 'checkpoint-3'} failed (")
    assert line.endswith(f"the previous checkpoint {out / 'checkpoint-2'} is intact")
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert not (out / "summary.json").exists()  # no longer looks finished
    assert _sft(out, "--max_steps", "4", "--resume_from_checkpoint", "latest") == 0
    assert_same_run(str(full), str(out))


def test_read_only_output_dir(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through chmod; sysfs refuses even root
        out = "/sys/fs"
        if not os.path.isdir(out):
            pytest.skip("running as root and no /sys/fs to stand for a read-only directory")
    else:
        out = str(tmp_path / "ro")
        os.makedirs(out)
        os.chmod(out, 0o555)
    assert _sft(out) == 2
    assert f"output_dir {out!r} is not writable" in _err(capsys)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
    """SIGKILL a `--save_steps 1` run at random moments (during saves too), resuming each
    time: the directory always resumes, and ends with the uninterrupted run's weights."""
    full, out = tmp_path / "full", tmp_path / "sft"
    assert _sft(full, "--max_steps", "12") == 0
    rng = random.Random(0)
    for _ in range(4):
        saved = len(list_checkpoints(str(out)))
        resume = ["--resume_from_checkpoint", "latest"] if saved else []
        extra = resume or (["--overwrite_output_dir"] if out.exists() else [])
        proc = _sft_cli(out, "--max_steps", "12", "--save_steps", "1", *extra)
        while proc.poll() is None and len(list_checkpoints(str(out))) <= saved:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # a step and its save take about as long
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    extra = ["--resume_from_checkpoint", "latest"] if list_checkpoints(str(out)) else []
    assert _sft(out, "--max_steps", "12", "--save_steps", "1", *extra,
                *([] if extra else ["--overwrite_output_dir"])) == 0
    wa = load_file(str(full / "model.safetensors"))
    wb = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finished_ppo_run_continues_bit_for_bit(tiny_run, tmp_path):
    """`--max_steps 2 --save_steps 2`, then `--max_steps 4 --resume_from_checkpoint latest`
    equals a 4-step run: weights, value head, metrics rows and summary; run_config.json
    keeps the resume history. At a constant learning rate: PPO's default linear decay is a
    function of max_steps, so a run continued to more steps follows another schedule."""
    root, _ = tiny_run
    full, cont = str(tmp_path / "full"), str(tmp_path / "cont")
    args = list(PPO_TINY) + ["--lr_scheduler_type", "constant"]
    args[args.index("--eval_steps") + 1] = "0"
    run_stage("ppo", root, "--output_dir", full, *args)
    run_stage("ppo", root, "--output_dir", cont, *args, "--max_steps", "2", "--save_steps", "2")
    assert [s for s, _ in list_checkpoints(cont)] == [2]
    run_stage("ppo", root, "--output_dir", cont, *args, "--save_steps", "2",
              "--resume_from_checkpoint", "latest")
    assert_same_run(full, cont, files=("model.safetensors",))
    heads = [torch.load(os.path.join(d, "value_head.pt"), weights_only=True) for d in (full, cont)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    record = json.load(open(os.path.join(cont, "run_config.json")))
    assert record["max_steps"] == 4
    (entry,) = record["history"]
    assert entry["step"] == 2 and entry["config"]["max_steps"] == 2
    assert entry["resumed_from"].endswith("checkpoint-2")
    assert entry["changed"] == {"max_steps": {"from": 2, "to": 4}}


def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path):
    """The restored optimizer runs at the resuming run's learning rate: continuing with
    another rate gives other weights than continuing with the same one, and the record says
    which rate ran."""
    base = tmp_path / "base"
    assert _sft(base, "--save_steps", "2") == 0
    runs = {}
    for lr in ("0.001", "0.01"):
        out = tmp_path / f"lr{lr}"
        shutil.copytree(base, out)
        assert _sft(out, "--max_steps", "3", "--learning_rate", lr,
                    "--resume_from_checkpoint", "latest") == 0
        runs[lr] = load_file(str(out / "model.safetensors"))
    changed = json.load(open(tmp_path / "lr0.01" / "run_config.json"))["history"][-1]["changed"]
    assert changed == {"learning_rate": {"from": 0.001, "to": 0.01},
                       "max_steps": {"from": 2, "to": 3}}
    assert not all(torch.equal(runs["0.001"][k], runs["0.01"][k]) for k in runs["0.001"])


def test_non_finite_weights_are_never_saved_as_good(tmp_path, capsys, monkeypatch):
    """Weights that turn inf without a non-finite loss (here: set so at step 3, as an
    overflowing learning rate would) are refused by the save: the run stops with one line
    pointing to checkpoint-2, and every checkpoint on disk is finite."""
    out = tmp_path / "sft"
    real, calls = sft_module.nll, {"n": 0}

    def nll_then_blow_up(model, batch):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return real(model, batch)

    monkeypatch.setattr(sft_module, "nll", nll_then_blow_up)
    assert _sft(out, "--max_steps", "5", "--save_steps", "1", "--logging_steps", "100") == 1
    assert _err(capsys) == (f"rlhf-toy: error: non-finite weights at step 3; training stopped, "
                            f"last good checkpoint: {out / 'checkpoint-2'}")
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2]
    for _, path in list_checkpoints(str(out)):
        weights = load_file(os.path.join(path, "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), path
    assert not (out / "summary.json").exists()


def test_progress_in_a_log_file_prints_lines_without_carriage_returns(capsys, monkeypatch):
    """stderr is not a terminal here (pytest captures it): plain lines, at most one per
    interval, and none with a carriage return."""
    from rlhf_toy.train.common import LineProgress, progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = progress(3, "sft")
    assert isinstance(bar, LineProgress)
    bar.interval = 0.0
    bar.set_postfix(loss="1.250")
    bar.update(1)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert err == "sft: 1/3 loss=1.250\nsft: 2/3 loss=1.250\n"


def test_negative_flag_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    flag = "--no_whiten_advantages, --no-whiten-advantages "
    text = "set whiten_advantages to false (same as --whiten_advantages false)"
    assert flag + text + " --" in out  # no "(default: False)" after it
