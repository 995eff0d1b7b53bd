"""Tasks' gold rewards against hand values, corpus statistics, tokenizer round trip."""

import random

import pytest

from rlhf_toy.errors import UsageError
from rlhf_toy.tasks import TASKS, get_task
from rlhf_toy.tasks.sentiment import _parse_prefix, _sigmoid
from rlhf_toy.tokenizer import build_tokenizer, load_tokenizer


@pytest.mark.parametrize(("response", "expected"), [
    # s = 2 * 2 (very great) -> sigmoid(4 / 2); fully grammatical
    ("very great .", _sigmoid(2.0)),
    # s = -1 * -1 (not bad) + -1 (dull) + 2 (great) = 2 -> sigmoid(1); two sentences parse
    ("not bad but dull . the plot was great .", _sigmoid(1.0)),
    # 4 words, the second "very" breaks the grammar after 2: fluency 2/4; s = 4 + 4
    ("very great very great", _sigmoid(4.0) * 0.5),
    ("", 0.0),
    # a neutral adjective: s = 0 -> 0.5
    ("long .", 0.5),
])
def test_sentiment_gold_hand_values(response, expected):
    assert get_task("sentiment").gold("the movie was", response) == pytest.approx(expected)


def test_sentiment_grammar_accepts_every_corpus_response():
    task = get_task("sentiment")
    for _, response in task.sft_corpus(500, random.Random(1)):
        words = response.split()
        assert _parse_prefix(words) == len(words), response
        assert len(words) <= task.max_response_tokens


def test_sentiment_corpus_is_balanced_near_half():
    task = get_task("sentiment")
    gold = [task.gold(p, r) for p, r in task.sft_corpus(3000, random.Random(0))]
    mean = sum(gold) / len(gold)
    assert 0.45 < mean < 0.55
    assert min(gold) < 0.15 and max(gold) > 0.85  # room both ways


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    ("sort 4 1 3 :", "1 3 4", 1.0),
    ("sort 4 1 3 :", "1 4 3", 1 / 3),
    ("sort 4 1 3 :", "1 3", 2 / 3),  # a missing digit
    ("sort 4 1 3 :", "1 3 4 4", 3 / 4),  # an extra digit
    ("sort 4 1 3 :", "", 0.0),
])
def test_sorting_gold_hand_values(prompt, response, expected):
    assert get_task("sorting").gold(prompt, response) == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_in_unit_interval_and_deterministic_corpus(name):
    task = get_task(name)
    a = task.sft_corpus(200, random.Random(3))
    assert a == task.sft_corpus(200, random.Random(3))
    for prompt, response in a:
        assert 0.0 <= task.gold(prompt, response) <= 1.0
        assert len(prompt.split()) <= task.max_prompt_tokens


def test_unknown_task_is_a_usage_error():
    with pytest.raises(UsageError, match="task must be one of"):
        get_task("chess")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tokenizer_round_trip(tmp_path, name):
    task = get_task(name)
    tok = build_tokenizer(task.words)
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 4 + len(task.words)
    prompt, response = task.sft_corpus(1, random.Random(0))[0]
    ids = tok(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(response.split()) and tok.unk_token_id not in ids
    assert tok.decode(ids) == response
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again(response, add_special_tokens=False)["input_ids"] == ids
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert again("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
