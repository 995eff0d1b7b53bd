"""`long_review`: the sentiment task with reviews of 64 words and more (the `gpt2` preset's task).

Prompts are those of `sentiment` ("the plot was"). A response is a run of sentences of
the `sentiment` grammar, as many as it takes to reach a drawn length of 64 to 80 words:

    response := clauses ("the" SUBJECT VERB clauses)*
    clauses  := clause (conj clause)? "."
    clause   := ADVERB? ADJECTIVE

Every word is one token of the task's word-level tokenizer, so every corpus response is
at least 64 tokens long (at most 88, EOS excluded). Positive and negative adjectives are
equally likely, so the SFT policy's gold reward starts near 0.5.

The hidden gold reward is the `sentiment` scorer over the whole review, scaled for its
length, times a fluency factor that also asks for the length:

    gold = sigmoid(s / 8) * q,     q = g / max(n, 64)

    s: `sentiment_score` of the response's words (about 13 adjectives, so its standard
       deviation over the corpus is about 7; the scale 8 keeps sigmoid off its flat ends)
    n: the number of words; g: the words of the complete, grammatical sentences before
       the first error (a cut-off last sentence does not count)

So a review that stops early (n < 64) or breaks the grammar loses gold in proportion, and
the long responses this task exists for are what the policy has to keep producing.
"""

from __future__ import annotations

import math
import random

from rlhf_toy.tasks.sentiment import (
    ADVERBS,
    CONJUNCTIONS,
    POLARITY,
    SUBJECTS,
    VERBS,
    SentimentTask,
    sentiment_score,
)

MIN_WORDS, MAX_TARGET_WORDS = 64, 80
LONGEST_SENTENCE = 9  # "the plot was very good but not dull ."
SCALE = 8.0

# the grammar as a finite automaton over word classes: state -> {class: next state}
WORD_CLASS = {**{w: "adj" for w in POLARITY}, **{w: "adv" for w in ADVERBS},
              **{w: "conj" for w in CONJUNCTIONS}, **{w: "subject" for w in SUBJECTS},
              **{w: "verb" for w in VERBS}, ".": ".", "the": "the"}
TRANSITIONS = {
    "open": {"adv": "adverb", "adj": "clause"},  # a first clause starts
    "adverb": {"adj": "clause"},
    "clause": {"conj": "open2", ".": "end"},
    "open2": {"adv": "adverb2", "adj": "clause2"},  # a second clause, after "and" / "but"
    "adverb2": {"adj": "clause2"},
    "clause2": {".": "end"},
    "end": {"the": "the"},  # a sentence ended; another may start
    "the": {"subject": "subject"},
    "subject": {"verb": "open"},
}


def grammatical_words(words: list[str]) -> int:
    """The number of leading words that form complete sentences of the grammar: the
    position just after the last "." reached before the first word that does not parse."""
    state, complete = "open", 0
    for i, w in enumerate(words):
        state = TRANSITIONS[state].get(WORD_CLASS.get(w, ""), "")
        if not state:
            break
        if state == "end":
            complete = i + 1
    return complete


class LongReviewTask(SentimentTask):
    """Sentiment reviews of 64 to 88 words; gold asks for positive, fluent and long."""

    name = "long_review"
    # the last sentence starts before MAX_TARGET_WORDS words and adds at most 9
    max_response_tokens = MAX_TARGET_WORDS - 1 + LONGEST_SENTENCE

    def sample_response(self, prompt: str, rng: random.Random) -> str:
        target = rng.randint(MIN_WORDS, MAX_TARGET_WORDS)
        words = self._clauses(rng).split()
        while len(words) < target:
            words += f"the {rng.choice(SUBJECTS)} {rng.choice(VERBS)}".split()
            words += self._clauses(rng).split()
        return " ".join(words)

    def gold(self, prompt: str, response: str) -> float:
        words = response.split()
        if not words:
            return 0.0
        fluency = grammatical_words(words) / max(len(words), MIN_WORDS)
        # sigmoid(x) as 0.5 * (1 + tanh(x / 2)): no overflow however long the response
        return 0.5 * (1.0 + math.tanh(sentiment_score(words) / SCALE / 2)) * fluency
