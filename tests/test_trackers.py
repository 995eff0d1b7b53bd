"""`--report_to`: metrics.jsonl's rows also go to accelerate's trackers."""

import importlib.util
import json
import os
import re

import pytest
from conftest import run_stage

from rlhf_toy.cli import main
from rlhf_toy.config import SFTConfig, parse_config
from rlhf_toy.errors import UsageError

SFT = ["--max_steps", "20", "--logging_steps", "5", "--n_eval_prompts", "16"]


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    """Every logged loss (steps 5, 10, 15, 20) and the final eval_loss read back from the
    event files under OUTPUT_DIR/tensorboard/rlhf_toy equal metrics.jsonl's (float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_stage("sft", str(tmp_path), *SFT, "--report_to", "tensorboard")
    out = tmp_path / "sft"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "rlhf_toy"))
    events.Reload()
    for tag in ("loss", "eval_loss"):
        want = [(r["step"], r[tag]) for r in rows if tag in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [s for s, _ in want] == [20]  # eval_loss: the final row only


def test_no_tracker_by_default(tmp_path):
    run_stage("sft", str(tmp_path), *SFT[:2], "--n_eval_prompts", "16")
    assert not os.path.exists(tmp_path / "sft" / "tensorboard")


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_missing_tracker_is_one_line_exit_2(tmp_path, capsys, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    code = main(["sft", "--output_dir", str(tmp_path / "sft"), "--report_to", tracker])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"pip install {tracker}" in err
    assert not os.path.exists(tmp_path / "sft" / "metrics.jsonl")


def test_unknown_tracker_is_a_usage_error():
    with pytest.raises(UsageError, match=re.escape("report_to must be none | tensorboard | "
                                                   "wandb | trackio (got 'mlflow')")):
        parse_config(SFTConfig, ["--report_to", "mlflow"])
