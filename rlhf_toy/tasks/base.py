"""The task interface: vocabulary, prompts, an SFT corpus and a hidden gold reward.

A task is plain Python over whitespace-separated words. Nothing in training may call
`gold` directly: PPO sees only the learned reward model, DPO only preference pairs.
`gold` is for labelling preferences (through a noisy Bradley-Terry draw) and for
measuring every claim against the truth.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod


class Task(ABC):
    """A toy text task with a gold reward in [0, 1].

    Attributes:
        name: registry name.
        words: the task vocabulary (special tokens are added by the tokenizer).
        max_prompt_tokens: the longest prompt `sample_prompt` produces.
        max_response_tokens: the longest corpus response, EOS excluded.
        target_kl: the KL to the reference (nats per response) that PPO's adaptive
            controller aims at on this task when `--target_kl` is not given; None: PPO's
            default (`config.DEFAULT_TARGET_KL`). How far a policy can move before the
            learned reward model stops tracking the gold reward depends on the task.
    """

    name: str = ""
    words: tuple[str, ...] = ()
    max_prompt_tokens: int = 0
    max_response_tokens: int = 0
    target_kl: float | None = None

    @abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        """One prompt string."""

    @abstractmethod
    def sample_response(self, prompt: str, rng: random.Random) -> str:
        """One SFT-corpus response to `prompt` (EOS not included)."""

    @abstractmethod
    def gold(self, prompt: str, response: str) -> float:
        """The hidden reward of `response` to `prompt`, in [0, 1]."""

    def sample_prompts(self, n: int, rng: random.Random) -> list[str]:
        return [self.sample_prompt(rng) for _ in range(n)]

    def sft_corpus(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        """`n` (prompt, response) pairs from the task's reference distribution."""
        pairs = []
        for _ in range(n):
            prompt = self.sample_prompt(rng)
            pairs.append((prompt, self.sample_response(prompt, rng)))
        return pairs

    def gold_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.gold(p, r) for p, r in zip(prompts, responses, strict=True)]
