"""`sorting`: a verifiable task with an exact gold reward.

Prompt: "sort 4 1 3 :"; the right response is the digits in ascending order, "1 3 4".
Gold reward: the fraction of positions that hold the right digit, over the longer of
the response and the answer (so missing, extra or misplaced digits all cost):

    gold = #{i : response[i] == sorted[i]} / max(len(response), len(sorted))

The SFT corpus is an imperfect teacher: it answers correctly 30% of the time and
otherwise returns the sorted list with one or two adjacent swaps, so the SFT policy
starts in the middle of the scale.
"""

from __future__ import annotations

import random

from rlhf_toy.tasks.base import Task

DIGITS = tuple(str(d) for d in range(10))


class SortingTask(Task):
    name = "sorting"
    words = ("sort", ":") + DIGITS
    min_len, max_len = 3, 5
    max_prompt_tokens = max_len + 2
    max_response_tokens = max_len
    target_kl = 2.0  # README, "Defaults that hold on every task" (5 seeds at 2, 2.5 and 3)

    @staticmethod
    def _digits(prompt: str) -> list[str]:
        return prompt.split()[1:-1]

    def sample_prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "sort " + " ".join(rng.choice(DIGITS) for _ in range(n)) + " :"

    def sample_response(self, prompt: str, rng: random.Random) -> str:
        answer = sorted(self._digits(prompt))
        if rng.random() >= 0.3:
            for _ in range(rng.randint(1, 2)):
                i = rng.randrange(len(answer) - 1)
                answer[i], answer[i + 1] = answer[i + 1], answer[i]
        return " ".join(answer)

    def gold(self, prompt: str, response: str) -> float:
        answer = sorted(self._digits(prompt))
        words = response.split()
        hits = sum(a == b for a, b in zip(words, answer, strict=False))
        return hits / max(len(words), len(answer))
