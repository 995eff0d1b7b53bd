"""Sampling responses with a KV cache, and the per-token quantities of a rollout.

Shapes: B batch, P prompt length (left-padded), T response length (right-padded), V vocab.

The token MDP: the state s_t is prompt + response[:t], the action a_t is response token
t. A response ends when the policy emits EOS (the EOS token is part of the response
and carries the score) or when it reaches `max_new_tokens` (cut by the length limit).
After the end, rows hold `pad_token_id` and `mask == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlhf_toy.models import position_ids_from_mask


@dataclass
class Samples:
    """A batch of sampled responses.

    Attributes:
        prompt_ids: (B, P) left-padded prompt tokens.
        prompt_mask: (B, P) 1 on real prompt tokens.
        response_ids: (B, T) right-padded response tokens (EOS included when emitted).
        mask: (B, T) 1 on real response tokens (the EOS too), 0 after the end.
        logprobs: (B, T) log pi(a_t | s_t) at the sampling temperature; 0 on padding.
        ended_with_eos: (B,) True where the response ended by emitting EOS.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ended_with_eos: torch.Tensor

    def select(self, index: torch.Tensor) -> Samples:
        """The rows `index` of every field."""
        return Samples(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu"):
    """Tokenize and left-pad prompts: returns (prompt_ids (B, P), prompt_mask (B, P))."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt", padding_side="left",
                    add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_responses(tokenizer, responses: list[str], add_eos: bool = True,
                     device: torch.device | str = "cpu"):
    """Tokenize and right-pad responses (EOS appended): returns (response_ids, mask), (B, T)."""
    eos = [tokenizer.eos_token_id] if add_eos else []
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in responses]
    t = max(1, max(len(x) for x in ids))
    out = torch.full((len(ids), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return out.to(device), mask.to(device)


def decode_responses(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Response strings without EOS and padding."""
    eos = tokenizer.eos_token_id
    texts = []
    for ids, m in zip(response_ids.tolist(), mask.tolist(), strict=True):
        toks = [i for i, keep in zip(ids, m, strict=True) if keep and i != eos]
        texts.append(tokenizer.decode(toks))
    return texts


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           greedy: bool = False, generator: torch.Generator | None = None) -> Samples:
    """Sample responses token by token with a KV cache.

    Log-probs are those of the full softmax at `temperature` (top-k only narrows the
    draw), so they equal a fresh forward pass with logits divided by `temperature`.

    Args:
        model: a causal LM (`GPT2LMHeadModel`).
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        greedy: take the argmax instead of sampling (log-probs still at `temperature`).
        generator: torch RNG for reproducible draws.
    """
    b, device = prompt_ids.shape[0], prompt_ids.device
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    cache = DynamicCache()
    input_ids, pos = prompt_ids, positions
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), device=device)
    mask = torch.zeros((b, max_new_tokens), dtype=torch.long, device=device)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for t in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=pos,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1].float() / temperature  # (B, L, V) -> (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        if greedy:
            token = logits.argmax(-1)  # (B,)
        else:
            probs = torch.softmax(_filter_top_k(logits, top_k), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens[:, t] = token
        logprobs[:, t] = torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
        mask[:, t] = alive.long()
        alive = alive & (token != eos_token_id)
        if not alive.any():
            tokens, logprobs, mask = tokens[:, : t + 1], logprobs[:, : t + 1], mask[:, : t + 1]
            break
        input_ids, pos = token[:, None], next_pos
        next_pos = next_pos + 1
        attention = torch.cat([attention, torch.ones((b, 1), dtype=attention.dtype,
                                                     device=device)], dim=1)
    ended = ((tokens == eos_token_id) & mask.bool()).any(-1)
    return Samples(prompt_ids, prompt_mask, tokens, mask, logprobs, ended)
