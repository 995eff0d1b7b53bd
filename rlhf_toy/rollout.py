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
import torch.nn.functional as F
from transformers import DynamicCache, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

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


def lean_gpt2_supported(model) -> bool:
    """Whether `lean_gpt2_hidden` may stand in for `model`'s own forward: a plain
    `GPT2LMHeadModel` (not wrapped, no patched `forward`, no hooks, no sharded blocks)
    with GPT-2's standard attention."""
    c = getattr(model, "config", None)
    if type(model) is not GPT2LMHeadModel or "forward" in vars(model):
        return False
    modules = (model, model.transformer, *model.transformer.h)
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return False
    return (all(type(b) is GPT2Block for b in model.transformer.h)
            and c._attn_implementation in ("sdpa", "eager") and c.scale_attn_weights
            and not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn
            and not c.add_cross_attention)


def attention_mask_4d(key_valid: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, 1, L, S) bool for queries at positions start..start+L-1 over keys 0..S-1
    (S = start + L): causal, real keys only, and always the query's own position, so a
    padding query attends to something and stays finite.

    Args:
        key_valid: (B, >= S) 1 on real tokens.
    """
    end = start + length
    q = torch.arange(start, end, device=key_valid.device)[:, None]  # (L, 1)
    k = torch.arange(end, device=key_valid.device)[None, :]  # (1, S)
    keep = (k <= q)[None] & key_valid[:, None, :end].bool()  # (B, L, S)
    return (keep | (k == q)[None])[:, None]  # (B, 1, L, S)


class StaticKVCache:
    """Per-layer (K, V) buffers of shape (B, nh, max_len, hd), filled position by position."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []


def lean_gpt2_hidden(model: GPT2LMHeadModel, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, mask: torch.Tensor,
                     cache: StaticKVCache | None = None, start: int = 0) -> torch.Tensor:
    """GPT-2's forward pass up to the final layer norm, without `transformers`' per-call
    machinery (mask builders, cache objects, output classes), which is most of a small
    model's step. Same modules and operations, so the same numbers as `model(...)`.

    Args:
        input_ids, position_ids: (B, L) the tokens fed now.
        mask: (B, 1, L, start + L) bool attention mask (`attention_mask_4d`).
        cache: buffers to write positions start..start+L-1 into and attend over (all
            earlier positions included); None attends within `input_ids` only.
    Returns:
        (B, L, H) final hidden states (after `ln_f`).
    """
    t, n_head = model.transformer, model.config.n_head
    x = t.drop(t.wte(input_ids) + t.wpe(position_ids))  # (B, L, H)
    b, length, h = x.shape
    end = start + length
    for i, block in enumerate(t.h):
        qkv = block.attn.c_attn(block.ln_1(x))  # (B, L, 3H)
        q, k, v = (y.view(b, length, n_head, -1).transpose(1, 2)  # (B, nh, L, hd)
                   for y in qkv.split(h, dim=2))
        if cache is not None:
            if len(cache.layers) <= i:
                shape = (b, n_head, cache.max_len, k.shape[-1])
                cache.layers.append((k.new_empty(shape), v.new_empty(shape)))
            k_all, v_all = cache.layers[i]
            k_all[:, :, start:end] = k
            v_all[:, :, start:end] = v
            k, v = k_all[:, :, :end], v_all[:, :, :end]  # (B, nh, S, hd)
        p_drop = block.attn.attn_dropout.p if block.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        x = x + block.attn.resid_dropout(
            block.attn.c_proj(att.transpose(1, 2).reshape(b, length, h)))  # (B, L, H)
        x = x + block.mlp(block.ln_2(x))
    return t.ln_f(x)


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
    b, p, device = prompt_ids.shape[0], prompt_ids.shape[1], prompt_ids.device
    # the whole attention mask up front (generated positions are 1); step t reads a prefix
    attention = torch.cat([prompt_mask.long(), torch.ones((b, max_new_tokens), dtype=torch.long,
                                                          device=device)], dim=1)  # (B, P + T)
    positions = position_ids_from_mask(attention[:, :p])  # (B, P)
    lean = lean_gpt2_supported(model)
    kv = StaticKVCache(p + max_new_tokens)
    cache = DynamicCache()
    input_ids, pos = prompt_ids, positions
    next_pos = positions[:, -1:] + 1  # (B, 1)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    pad = torch.full((b,), pad_token_id, dtype=torch.long, device=device)
    # a device-to-host sync per step stalls a GPU: test "all ended" every few steps there
    check_every = 1 if device.type == "cpu" else 8
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for t in range(max_new_tokens):
        if lean:
            start = 0 if t == 0 else p + t - 1
            hidden = lean_gpt2_hidden(model, input_ids, pos,
                                      attention_mask_4d(attention, start, input_ids.shape[1]),
                                      kv, start)  # (B, L, H)
            logits = model.lm_head(hidden[:, -1])  # (B, V)
        else:  # only the last position's logits are needed (the prompt's are never read)
            logits = model(input_ids=input_ids, attention_mask=attention[:, : p + t],
                           position_ids=pos, cache=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1]  # (B, 1, V) -> (B, V)
        logits = logits.float() / temperature
        if greedy:
            token = logits.argmax(-1)  # (B,)
        else:
            probs = torch.softmax(_filter_top_k(logits, top_k), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        token = torch.where(alive, token, pad)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)  # (B,)
        steps.append((token, torch.where(alive, logp, 0.0), alive))
        alive = alive & (token != eos_token_id)
        if (t + 1) % check_every == 0 and not alive.any():
            break
        input_ids, pos = token[:, None], next_pos
        next_pos = next_pos + 1
    tokens, logprobs, mask = (torch.stack(x, dim=1) for x in zip(*steps, strict=True))  # (B, T)
    mask = mask.long()
    if check_every > 1:  # trim the steps taken after every response had ended
        n = int(mask.any(0).sum())
        tokens, logprobs, mask = tokens[:, :n], logprobs[:, :n], mask[:, :n]
    ended = ((tokens == eos_token_id) & mask.bool()).any(-1)
    return Samples(prompt_ids, prompt_mask, tokens, mask, logprobs, ended)
