"""The lean GPT-2 path: GPT-2's forward pass without `transformers`' per-call machinery,
a static KV cache, and the CUDA-graph decode step built on them.

Shapes: B batch, L tokens fed now, S key positions, H hidden width, nh heads, hd head width,
V vocabulary.

This is the fast path only. The readable reference is `transformers`' own forward
(`model(...)`), which `models.response_logits`, `models.reward_scores` and
`rollout.sample` use for every model this path does not support
(`lean_gpt2_supported`); tests check that both give the same numbers.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def lean_gpt2_supported(model, kinds: tuple[type, ...] = (GPT2LMHeadModel,)) -> bool:
    """Whether `lean_gpt2_hidden` may stand in for `model`'s own forward: a plain
    `GPT2LMHeadModel` (or another of `kinds`; not wrapped, no patched `forward`, no hooks,
    no sharded blocks) with GPT-2's standard attention."""
    c = getattr(model, "config", None)
    if type(model) not in kinds or "forward" in vars(model):
        return False
    if model.training and model.transformer.gradient_checkpointing:  # lean keeps activations
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
    """Per-layer (K, V) buffers of shape (B, nh, max_len, hd), filled position by position.

    `zeroed`: allocate them zero-filled, as a step that attends over the whole length
    needs (a masked key's weight is exactly 0, but 0 * NaN from uninitialised memory is not).
    """

    def __init__(self, max_len: int, zeroed: bool = False):
        self.max_len, self.zeroed = max_len, zeroed
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []


def lean_gpt2_hidden(model: GPT2LMHeadModel, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, mask: torch.Tensor,
                     cache: StaticKVCache | None = None, start: int = 0,
                     write_index: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2's forward pass up to the final layer norm, without `transformers`' per-call
    machinery (mask builders, cache objects, output classes), which is most of a small
    model's step. Same modules and operations, so the same numbers as `model(...)`.

    Args:
        input_ids, position_ids: (B, L) the tokens fed now.
        mask: (B, 1, L, start + L) bool attention mask (`attention_mask_4d`).
        cache: buffers to write positions start..start+L-1 into and attend over (all
            earlier positions included); None attends within `input_ids` only.
        write_index: static shapes (for a CUDA graph): a (L,) device tensor of the cache
            positions to write instead of `start`, attending over the whole cache length
            (`mask` is then (B, 1, L, max_len); the cache must be `zeroed`).
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
                new = k.new_zeros if cache.zeroed else k.new_empty
                cache.layers.append((new(shape), new(shape)))
            k_all, v_all = cache.layers[i]
            if write_index is not None:  # static shapes: every position, masked
                k_all.index_copy_(2, write_index, k)
                v_all.index_copy_(2, write_index, v)
                k, v = k_all, v_all  # (B, nh, max_len, hd)
            else:
                k_all[:, :, start:end] = k
                v_all[:, :, start:end] = v
                k, v = k_all[:, :, :end], v_all[:, :, :end]  # (B, nh, S, hd)
        p_drop = block.attn.attn_dropout.p if block.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        x = x + block.attn.resid_dropout(
            block.attn.c_proj(att.transpose(1, 2).reshape(b, length, h)))  # (B, L, H)
        x = x + block.mlp(block.ln_2(x))
    return t.ln_f(x)


def cuda_graphs_enabled() -> bool:
    """CUDA-graph decoding is on unless the environment sets RLHF_TOY_CUDA_GRAPHS=0."""
    return os.environ.get("RLHF_TOY_CUDA_GRAPHS", "1") != "0"


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class StaticDecoder:
    """The one-token decode step of `lean_gpt2_hidden` with static shapes, so that a CUDA
    graph can replay it: the token, its position and the cache position live in device
    buffers updated in place, and every step attends over the whole (zeroed) cache with
    a boolean mask (real prompt keys and generated keys up to the current position).

    The step also turns the logits into what sampling reads: `logits` (B, V) float at
    the temperature, `logp` (B, V) their log-softmax, and `probs` (B, V) the top-k
    filtered softmax (or `argmax` (B,) when greedy). The draw itself (multinomial with the
    caller's generator) stays outside the graph, so the RNG stream is the eager one.

    Without `capture()` (CPU, tests) `step()` runs the same operations eagerly.
    """

    def __init__(self, model, kv: StaticKVCache, key_valid: torch.Tensor,
                 token: torch.Tensor, position: torch.Tensor, cur: int,
                 temperature: float, top_k: int, greedy: bool):
        self.model, self.kv = model, kv
        self.temperature, self.top_k, self.greedy = temperature, top_k, greedy
        device = token.device
        self.key_valid = key_valid.bool()  # (B, S)
        self.key_pos = torch.arange(kv.max_len, device=device)  # (S,)
        self.token = token.reshape(-1, 1).clone()  # (B, 1)
        self.position = position.reshape(-1, 1).clone()  # (B, 1)
        self.cur = torch.full((1,), cur, dtype=torch.long, device=device)  # cache position
        self.graph = None
        self.out: dict[str, torch.Tensor] = {}

    def _compute(self) -> dict[str, torch.Tensor]:
        mask = (self.key_valid & (self.key_pos <= self.cur))[:, None, None, :]  # (B, 1, 1, S)
        hidden = lean_gpt2_hidden(self.model, self.token, self.position, mask, self.kv,
                                  write_index=self.cur)  # (B, 1, H)
        logits = self.model.lm_head(hidden[:, -1]).float() / self.temperature  # (B, V)
        out = {"logits": logits, "logp": torch.log_softmax(logits, dim=-1)}
        if self.greedy:
            out["argmax"] = logits.argmax(-1)
        else:
            out["probs"] = torch.softmax(filter_top_k(logits, self.top_k), dim=-1)
        return out

    def capture(self, warmup: int = 1) -> None:
        """Warm up on a side stream, then capture one step (PyTorch's CUDA-graph recipe).

        The step is idempotent (it rewrites the same cache position from the same inputs),
        so the warm-up runs need no undoing. Autocast's weight-cast cache is disabled in
        here: a graph must recompute the casts, not read copies cached outside it."""
        device_type = "cuda"
        autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                                  enabled=torch.is_autocast_enabled(device_type),
                                  cache_enabled=False)
        device = self.token.device
        if device not in _CAPTURE_STREAMS:  # one per device: its cuBLAS workspace is reused
            _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
        stream = _CAPTURE_STREAMS[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        with autocast, torch.cuda.stream(stream):
            for _ in range(warmup):
                self._compute()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than `torch.cuda.graph`, which empties the allocator cache
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = self._compute()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = graph

    def step(self) -> dict[str, torch.Tensor]:
        """Run the step for the current buffers; the returned tensors are overwritten by the
        next step."""
        if self.graph is None:
            return self._compute()
        self.graph.replay()
        return self.out

    def advance(self, token: torch.Tensor) -> None:
        """Feed `token` (B,) at the next position."""
        self.token.copy_(token[:, None])
        self.position.add_(1)
        self.cur.add_(1)
