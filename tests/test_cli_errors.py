"""Bad input ends in exit code 2 and one line naming the problem, never a traceback."""

import os
import subprocess
import sys

import pytest

from rlhf_toy.cli import main


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def prefs_without_rejected(tmp_path):
    from datasets import Dataset, DatasetDict

    d = Dataset.from_dict({"prompt": ["the movie was"], "chosen": ["great ."]})
    path = tmp_path / "bad_prefs"
    DatasetDict(train=d, test=d).save_to_disk(str(path))
    return str(path)


@pytest.fixture
def config_files(tmp_path):
    files = {"unknown": "n_layer: 2\nnot_a_field: 3\n", "badtype": "learning_rate: fast\n",
             "badyaml": "n_layer: [2\n", "ok": "max_steps: 1\n"}
    out = {}
    for name, text in files.items():
        out[name] = str(tmp_path / f"{name}.yaml")
        with open(out[name], "w") as fh:
            fh.write(text)
    return out


CASES = [
    (["sft", "--task", "chess"], "task must be one of ['long_review', 'sentiment', 'sorting']"),
    (["pipeline", "--task", "no_such_mod_q:T"], "task 'no_such_mod_q:T': no module named"),
    (["sft", "--not_a_field", "1"], "unknown argument '--not_a_field'"),
    (["sft", "--learning_rate", "-1"], "learning_rate must be in (0, 1]"),
    (["sft", "--n_embd", "30", "--n_head", "4"], "n_embd must be divisible by n_head"),
    (["ppo", "--beta", "-0.1"], "beta must be in [0, 1000]"),
    (["ppo", "--clip_range", "0"], "clip_range must be > 0"),
    (["ppo", "--gamma", "1.5"], "gamma must be in [0, 1]"),
    (["ppo", "--lam", "-0.1"], "lam must be in [0, 1]"),
    (["ppo", "--batch_size", "0"], "batch_size must be > 0"),
    (["ppo", "--mini_batch_size", "64", "--batch_size", "32"], "mini_batch_size must be <= batch_size"),
    (["ppo", "--kl_estimator", "k9"], "kl_estimator must be k1, k2 or k3"),
    (["sft", "--max_new_tokens", "40"], "max_new_tokens must be <= 29"),
    (["dance"], "stage must be one of"),
]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_values_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code, err = _run([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("rlhf-toy: error: ")
    assert message in err[0]


@pytest.mark.parametrize(("key", "message"), [
    ("unknown", "unknown config key 'not_a_field'"),
    ("badtype", "invalid float value: 'fast'"),
    ("badyaml", "is not valid YAML"),
])
def test_bad_config_files(config_files, key, message, tmp_path, capsys):
    code, err = _run(["sft", "--config", config_files[key], "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    code, err = _run(["sft", "--output_dir", str(path)], capsys)
    assert code == 2 and "is a file" in err[0]
    assert path.read_text() == "keep me"  # nothing already written is lost


def test_missing_inputs_are_reported_in_the_config_order(tmp_path, prefs_without_rejected,
                                                         capsys):
    """Every input is checked before anything is loaded, in the order the config declares
    them (sft_dir, reward_dir, prefs_dir), whatever the order on the command line."""
    code, err = _run(["prefs", "--sft_dir", str(tmp_path / "nope"), "--output_dir",
                      str(tmp_path / "p")], capsys)
    assert code == 2 and "does not exist" in err[0]
    code, err = _run(["ppo", "--reward_dir", str(tmp_path / "no_reward"), "--sft_dir",
                      str(tmp_path / "no_sft"), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and f"sft_dir: checkpoint {str(tmp_path / 'no_sft')!r} does not" in err[0]
    code, err = _run(["reward", "--prefs_dir", prefs_without_rejected, "--sft_dir",
                      str(tmp_path / "nope"), "--output_dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "sft_dir: checkpoint" in err[0]
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "r")


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlhf_toy.cli", "sft", "--task", "chess",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          env=env, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "rlhf-toy: error: task must be one of ['long_review', 'sentiment', 'sorting'] or "
        "package.module:ClassName (got 'chess')"]
