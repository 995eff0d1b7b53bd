"""`sentiment`: the DPO paper's controlled-sentiment setup at toy scale.

Prompts open a review ("the plot was"); the SFT corpus continues it with one or two
short sentences drawn uniformly from a small grammar, so positive and negative
reviews are equally likely and the SFT policy's gold reward starts near 0.5.

The hidden gold reward is a fixed lexical sentiment scorer times a fluency factor:

    gold = sigmoid(s / 2) * q

    s = sum over adjectives of  polarity(adj) * modifier(word before it)
        polarity: +-2 strong (great / awful), +-1 mild (good / dull), 0 neutral (long)
        modifier: very, really -> x2;  quite -> x1;  not -> x(-1);  none -> x1
    q = fraction of the response's words that parse under the grammar before the
        first error (1 for every corpus response, 0 for an empty one)

The fluency factor is what makes reward-model over-optimization measurable: the
reward model only ever sees grammatical SFT samples, so a policy pushed too far
towards "very great very great ..." fools the proxy but not the gold reward.
"""

from __future__ import annotations

import math
import random

from rlhf_toy.tasks.base import Task

SUBJECTS = ("movie", "plot", "acting", "music", "ending", "cast")
VERBS = ("was", "is", "felt", "seemed")
ADVERBS = ("very", "really", "quite", "not")
POLARITY = {
    "great": 2, "wonderful": 2, "brilliant": 2,
    "good": 1, "fun": 1, "nice": 1,
    "bad": -1, "dull": -1, "boring": -1,
    "awful": -2, "terrible": -2, "dreadful": -2,
    "long": 0, "short": 0, "loud": 0, "slow": 0,
}
MODIFIER = {"very": 2.0, "really": 2.0, "quite": 1.0, "not": -1.0}
CONJUNCTIONS = ("and", "but")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _parse_prefix(words: list[str]) -> int:
    """Number of leading words that follow the grammar

        response := clause (conj clause)? "." (sentence)?
        sentence := "the" SUBJECT VERB clause (conj clause)? "."
        clause   := ADVERB? ADJECTIVE

    A finite automaton; returns len(words) exactly when the whole response parses.
    """
    # states: 0 expect clause start, 1 after adverb, 2 after adjective (first clause),
    # 3 expect clause after conj, 4 after adverb (2nd clause), 5 after adj (2nd clause),
    # 6 after ".", 7 after "the", 8 after subject, 9 end (nothing may follow)
    state, sentences = 0, 0
    for i, w in enumerate(words):
        adj, adv = w in POLARITY, w in ADVERBS
        if state in (0, 3):
            state = (1 if state == 0 else 4) if adv else (2 if state == 0 else 5) if adj else -1
        elif state in (1, 4):
            state = state + 1 if adj else -1
        elif state == 2:
            state = 3 if w in CONJUNCTIONS else 6 if w == "." else -1
        elif state == 5:
            state = 6 if w == "." else -1
        elif state == 6:
            sentences += 1
            state = 7 if (w == "the" and sentences < 2) else -1
        elif state == 7:
            state = 8 if w in SUBJECTS else -1
        elif state == 8:
            state = 0 if w in VERBS else -1
        else:
            state = -1
        if state == -1:
            return i
    return len(words) if state == 6 else max(0, len(words) - 1)


def sentiment_score(words: list[str]) -> float:
    """The lexical sentiment `s` (before the sigmoid)."""
    s = 0.0
    for i, w in enumerate(words):
        if w in POLARITY:
            prev = words[i - 1] if i > 0 else ""
            s += POLARITY[w] * MODIFIER.get(prev, 1.0)
    return s


class SentimentTask(Task):
    name = "sentiment"
    words = tuple(dict.fromkeys(
        ("the",) + SUBJECTS + VERBS + ADVERBS + tuple(POLARITY) + CONJUNCTIONS + (".",)))
    max_prompt_tokens = 3
    max_response_tokens = 15
    target_kl = 3.0  # README, "Defaults that hold on every task" (5 seeds at 2, 2.5 and 3)

    def sample_prompt(self, rng: random.Random) -> str:
        return f"the {rng.choice(SUBJECTS)} {rng.choice(VERBS)}"

    def _clause(self, rng: random.Random) -> str:
        adj = rng.choice(tuple(POLARITY))
        adv = rng.choice(ADVERBS + ("",) * 2)
        return f"{adv} {adj}".strip()

    def _clauses(self, rng: random.Random) -> str:
        text = self._clause(rng)
        if rng.random() < 0.5:
            text += f" {rng.choice(CONJUNCTIONS)} {self._clause(rng)}"
        return text + " ."

    def sample_response(self, prompt: str, rng: random.Random) -> str:
        text = self._clauses(rng)
        if rng.random() < 0.4:
            text += f" the {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {self._clauses(rng)}"
        return text

    def gold(self, prompt: str, response: str) -> float:
        words = response.split()
        if not words:
            return 0.0
        fluency = _parse_prefix(words) / len(words)
        return _sigmoid(sentiment_score(words) / 2.0) * fluency
