"""Sampling responses with a KV cache, and the per-token quantities of a rollout.

Shapes: B batch, P prompt length (left-padded), T response length (right-padded), V vocab.

The token MDP: the state s_t is prompt + response[:t], the action a_t is response token
t. A response ends when the policy emits EOS (the EOS token is part of the response
and carries the score) or when it reaches `max_new_tokens` (cut by the length limit).
After the end, rows hold `pad_token_id` and `mask == 0`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlhf_toy.errors import UsageError
from rlhf_toy.lean_gpt2 import (
    StaticDecoder,
    StaticKVCache,
    attention_mask_4d,
    cuda_graphs_enabled,
    filter_top_k,
    lean_gpt2_hidden,
    lean_gpt2_supported,
)
from rlhf_toy.models import context_length, position_ids_from_mask


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


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text by default (Llama's do)."""
    bos = tokenizer.bos_token_id
    added = tokenizer("a")["input_ids"]  # a BOS that is the text's own token (e.g. UNK) is not added
    return (bos is not None and added[:1] == [bos]
            and len(added) > len(tokenizer("a", add_special_tokens=False)["input_ids"]))


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu"):
    """Tokenize and left-pad prompts, each after the BOS if the tokenizer adds one by
    default (`adds_bos`); no other special token. Returns (prompt_ids (B, P), prompt_mask
    (B, P)), the mask from the lengths."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    ids = [bos + x for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return left_pad(ids, tokenizer.pad_token_id, device)


def left_pad(ids: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """Token lists left-padded to one length: (ids (B, P), mask (B, P)), mask 1 on tokens."""
    p = max((len(x) for x in ids), default=0)
    out = torch.full((len(ids), p), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), p), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            out[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, p - len(x):] = 1
    return out.to(device), mask.to(device)


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
    """Response strings without EOS and padding (padding by the mask, whatever its id)."""
    eos = tokenizer.eos_token_id
    texts = []
    for ids, m in zip(response_ids.tolist(), mask.tolist(), strict=True):
        toks = [i for i, keep in zip(ids, m, strict=True) if keep and i != eos]
        texts.append(tokenizer.decode(toks))
    return texts


@torch.no_grad()
def finite_probs(probs: torch.Tensor) -> torch.Tensor:
    """Rows of `probs` (B, V) holding a NaN or inf become uniform, so that a model gone
    non-finite still samples (without a device sync); its NaN log-probs then reach the
    training loop's non-finite guard, which names the step. Finite rows are unchanged."""
    ok = torch.isfinite(probs).all(-1, keepdim=True)  # (B, V) -> (B, 1)
    return torch.where(ok, probs, 1.0)


def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           greedy: bool = False, generator: torch.Generator | None = None,
           cuda_graph: bool | None = None) -> Samples:
    """Sample responses token by token with a KV cache.

    Log-probs are those of the full softmax at `temperature` (top-k only narrows the
    draw), so they equal a fresh forward pass with logits divided by `temperature`.

    Args:
        model: a causal LM: a plain `GPT2LMHeadModel` runs the lean path
            (`lean_gpt2_supported`), any other its own forward with a `DynamicCache`.
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        greedy: take the argmax instead of sampling (log-probs still at `temperature`).
        generator: torch RNG for reproducible draws.
        cuda_graph: decode with static shapes, replaying one CUDA graph per token after an
            eager prompt pass (`StaticDecoder`). None: on CUDA for a plain GPT-2
            (`lean_gpt2_supported`) unless RLHF_TOY_CUDA_GRAPHS=0. True on CPU runs the
            static-shape step eagerly (for tests); False keeps the eager decoder.
    """
    b, p, device = prompt_ids.shape[0], prompt_ids.shape[1], prompt_ids.device
    limit = context_length(getattr(model, "config", {}))
    if limit is not None and p + max_new_tokens > limit:  # a BPE prompt can be long
        raise UsageError(f"max_new_tokens must be <= {limit - p} so that the longest prompt "
                         f"({p} tokens) and its response fit the model's {limit} positions "
                         f"(got {max_new_tokens})")
    # the whole attention mask up front (generated positions are 1); step t reads a prefix
    attention = torch.cat([prompt_mask.long(), torch.ones((b, max_new_tokens), dtype=torch.long,
                                                          device=device)], dim=1)  # (B, P + T)
    positions = position_ids_from_mask(attention[:, :p])  # (B, P)
    lean = lean_gpt2_supported(model)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and cuda_graphs_enabled()
    static = lean and cuda_graph and max_new_tokens > 1
    kv = StaticKVCache(p + max_new_tokens, zeroed=static)
    decoder: StaticDecoder | None = None
    cache = DynamicCache()
    input_ids, pos = prompt_ids, positions
    next_pos = positions[:, -1:] + 1  # (B, 1)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    pad = torch.full((b,), pad_token_id, dtype=torch.long, device=device)
    # a device-to-host sync per step stalls a GPU: test "all ended" every few steps there
    check_every = 1 if device.type == "cpu" else 8
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for t in range(max_new_tokens):
        step = None
        if decoder is not None:
            step = decoder.step()
            logits = step["logits"]
        elif lean:
            start = 0 if t == 0 else p + t - 1
            hidden = lean_gpt2_hidden(model, input_ids, pos,
                                      attention_mask_4d(attention, start, input_ids.shape[1]),
                                      kv, start)  # (B, L, H)
            logits = model.lm_head(hidden[:, -1])  # (B, V)
        else:  # only the last position's logits are needed (the prompt's are never read)
            logits = model(input_ids=input_ids, attention_mask=attention[:, : p + t],
                           position_ids=pos, cache=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1]  # (B, 1, V) -> (B, V)
        if step is not None:  # the static step already applied the temperature and softmaxes
            if greedy:
                token = step["argmax"]
            else:
                token = torch.multinomial(finite_probs(step["probs"]), 1,
                                          generator=generator).squeeze(-1)
            token = torch.where(alive, token, pad)
            logp = step["logp"].gather(-1, token[:, None]).squeeze(-1)  # (B,)
        else:
            logits = logits.float() / temperature
            if greedy:
                token = logits.argmax(-1)  # (B,)
            else:
                probs = finite_probs(torch.softmax(filter_top_k(logits, top_k), dim=-1))
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            token = torch.where(alive, token, pad)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
        steps.append((token, torch.where(alive, logp, 0.0), alive))
        alive = alive & (token != eos_token_id)
        if (t + 1) % check_every == 0 and not alive.any():
            break
        if decoder is not None:
            decoder.advance(token)
            continue
        if static:  # after the eager prompt pass: one static step per token from here on
            decoder = StaticDecoder(model, kv, attention, token, next_pos, p, temperature,
                                     top_k, greedy)
            if device.type == "cuda":
                try:
                    decoder.capture()
                except RuntimeError as err:  # e.g. an op that cannot be captured: stay eager
                    warnings.warn(f"CUDA-graph capture failed, running its step eagerly: {err}",
                                  RuntimeWarning, stacklevel=2)
                    torch.cuda.synchronize()
                    decoder.graph = None
        input_ids, pos = token[:, None], next_pos
        next_pos = next_pos + 1
    tokens, logprobs, mask = (torch.stack(x, dim=1) for x in zip(*steps, strict=True))  # (B, T)
    mask = mask.long()
    if check_every > 1:  # trim the steps taken after every response had ended
        n = int(mask.any(0).sum())
        tokens, logprobs, mask = tokens[:, :n], logprobs[:, :n], mask[:, :n]
    ended = ((tokens == eos_token_id) & mask.bool()).any(-1)
    return Samples(prompt_ids, prompt_mask, tokens, mask, logprobs, ended)
