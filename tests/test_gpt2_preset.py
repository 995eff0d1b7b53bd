"""The gpt2 size preset (configs/gpt2/) and its task, long_review: files load and fit the
context, gold is in [0, 1] with hand-computed values, responses reach 64 tokens."""

import math
import os
import random

import pytest

from rlhf_toy.cli import PIPELINE, PipelineConfig, _stage_argv, _stages
from rlhf_toy.config import parse_config
from rlhf_toy.tasks import get_task
from rlhf_toy.tasks.long_review import MIN_WORDS, grammatical_words
from rlhf_toy.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "gpt2")
STAGE_FILES = sorted(f[:-5] for f in os.listdir(PRESET) if f != "pipeline.yaml")


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_every_stage_of_the_pipeline_and_of_compare_has_a_file():
    assert set(PIPELINE) <= set(STAGE_FILES)
    assert {"grpo", "rloo", "reinforce_pp"} <= set(STAGE_FILES)  # compare trains them too


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_preset_files_validate_and_fit_long_responses(stage):
    """Each file parses into its stage's config; sampling stages leave room in the
    context (256 positions) for a 3-token prompt and the task's longest response + EOS."""
    cls = _stages()[stage][0]
    cfg = parse_config(cls, ["--config", os.path.join(PRESET, f"{stage}.yaml")])
    task = get_task(cfg.task)
    assert cfg.task == "long_review" and cfg.mixed_precision == "bf16"
    if hasattr(cfg, "max_new_tokens"):
        assert cfg.max_new_tokens >= task.max_response_tokens + 1 >= MIN_WORDS + 1
        assert task.max_prompt_tokens + cfg.max_new_tokens <= 256
    if stage == "sft":
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (12, 768, 12)
        assert cfg.n_positions >= 256


def test_pipeline_file_points_every_stage_at_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config_dir is relative to the repository root
    pipe = parse_config(PipelineConfig, ["--config", os.path.join(PRESET, "pipeline.yaml"),
                                         "--output_dir", str(tmp_path)])
    assert pipe.task == "long_review" and os.path.samefile(pipe.config_dir, PRESET)
    stages = _stages()
    for stage in PIPELINE:  # compare checks that the earlier stages' directories exist
        (tmp_path / stage).mkdir()
    for stage in PIPELINE:
        argv = _stage_argv(pipe, stage, stages[stage][0])
        assert argv[:2] == ["--config", os.path.join(pipe.config_dir, f"{stage}.yaml")]
        assert parse_config(stages[stage][0], argv).task == "long_review"


def test_corpus_responses_reach_64_tokens_and_gold_stays_in_the_unit_interval():
    task = get_task("long_review")
    tok = build_tokenizer(task.words)
    rng = random.Random(0)
    lengths, golds = [], []
    for prompt, response in task.sft_corpus(500, rng):
        ids = tok(response, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        lengths.append(len(ids))
        golds.append(task.gold(prompt, response))
    assert min(lengths) >= 64 and max(lengths) <= task.max_response_tokens
    assert all(0.0 <= g <= 1.0 for g in golds)
    mean = sum(golds) / len(golds)
    assert 0.4 < mean < 0.6  # positive and negative reviews equally likely
    words = sorted(task.words)
    for _ in range(300):  # any string of task words, grammatical or not
        response = " ".join(rng.choice(words) for _ in range(rng.randint(0, 120)))
        assert 0.0 <= task.gold("the plot was", response) <= 1.0


@pytest.mark.parametrize(("response", "expected"), [
    # 3 + 16 * 5 = 83 grammatical words; s = 2 * 2 (very great) + 16 * 1 (good) = 20
    ("very great ." + " the plot was good ." * 16, _sigmoid(20 / 8)),
    # 2 words, all grammatical, but 64 are asked for: q = 2 / 64; s = 1
    ("good .", _sigmoid(1 / 8) * 2 / 64),
    # the cut-off second sentence does not count: g = 3 of n = 7; s = 4 + 1
    ("very great . the plot was good", _sigmoid(5 / 8) * 3 / 64),
    # 4 + 21 * 3 = 67 words, an error at word 4 (a sentence opens with "the"): g = 3;
    # s = 2 (not awful) - 2 (awful) + 21 * 2 = 42
    ("not awful . awful" + " not awful ." * 21, _sigmoid(42 / 8) * 3 / 67),
    ("", 0.0),
    # 1 501 x "very awful" (s = -4 each, -6 004 in all): sigmoid(-750.5) is 0 to double
    # precision, where exp(750.5) in 1 / (1 + exp(-x)) would overflow
    ("very awful ." + " the plot was very awful ." * 1500, 0.0),
])
def test_gold_hand_values(response, expected):
    assert get_task("long_review").gold("the plot was", response) == pytest.approx(expected)


@pytest.mark.parametrize(("response", "expected"), [
    ("good .", 2),
    ("good and bad .", 4),
    ("good and bad and fun .", 0),  # one conjunction per sentence
    ("quite good . the cast felt not dull but loud .", 11),
    ("good . bad .", 2),  # a second sentence opens with "the SUBJECT VERB"
    ("good . the plot", 2),
    ("the plot was good .", 0),  # the prompt holds the first "the SUBJECT VERB"
])
def test_grammatical_words_counts_complete_sentences(response, expected):
    assert grammatical_words(response.split()) == expected
