"""Returns, advantages and masked statistics.

Shapes: B batch, T time (response tokens, or steps of a tabular episode).

`mask[b, t] = 1` marks a real step, 0 padding; float or bool masks are accepted.
`dones[b, t] = 1` means the episode ends after step t: nothing is bootstrapped past it.
"""

from __future__ import annotations

import torch


def _as_float(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over real positions only (never divides by padding).

    Args:
        x: any shape; mask: same shape, 1 = real.
        dim: reduce over this dim (None: over everything).
    Returns:
        scalar (dim None) or `x` reduced over `dim`; 0 where a slice has no real element.
    """
    m = _as_float(mask, x)
    x = torch.where(m.bool(), x, torch.zeros_like(x))  # padding may hold inf/nan: never let it in
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over real positions (scalar).

    With `unbiased`, divides by n - 1 (Bessel); with fewer than two real elements the
    variance is 0 (not NaN).
    """
    m = _as_float(mask, x)
    mean = masked_mean(x, m)
    centered = torch.where(m.bool(), x - mean, torch.zeros_like(x))
    n = m.sum()
    denom = (n - 1.0) if unbiased else n
    return (centered.pow(2) * m).sum() / denom.clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real positions; padding returned as 0.

    With `shift_mean=False` the mean is added back (only the scale changes). A constant
    tensor gives zeros, never a division by zero.
    """
    m = _as_float(mask, x)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m.bool(), out, torch.zeros_like(out))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real position of each row, for left- or right-padded masks.

    Args:
        mask: (B, T).
    Returns:
        (B,) long; rows without any real position get 0.
    """
    t = mask.shape[-1]
    flipped = mask.flip(-1).to(torch.long)  # first 1 from the right
    return ((t - 1 - flipped.argmax(-1)) * flipped.any(-1)).long()


def _as_2d(*xs: torch.Tensor):
    one_d = xs[0].dim() == 1
    return one_d, [x.unsqueeze(0) if one_d else x for x in xs]


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * (1 - done_t) * G_{t+1} (Sutton & Barto eq. 3.9), backwards in time.

    Args:
        rewards, dones: (B, T) or (T,).
    Returns:
        returns: same shape as `rewards`.
    """
    one_d, (r, d) = _as_2d(rewards, dones)
    d = d.to(r.dtype)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * (1.0 - d[:, t]) * running
        out[:, t] = running
    return out[0] if one_d else out


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float,
        lam: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}

    `lam = 1` gives discounted_returns - values; `lam = 0` the one-step TD error. The
    value after the last step of the tensor is taken as 0 (a row that runs to the end
    without a done is treated as cut there).

    Args:
        rewards, values, dones: (B, T) or (T,).
        mask: optional, same shape; padding gets advantages = returns = 0 and never
            influences a real position (its rewards and values are ignored).
    Returns:
        (advantages, returns) with returns = advantages + values.
    """
    one_d, (r, v, d) = _as_2d(rewards, values, dones)
    m = torch.ones_like(r) if mask is None else (mask.unsqueeze(0) if one_d else mask).to(r.dtype)
    real = m.bool()
    zero = torch.zeros_like(r)
    r, v, d = torch.where(real, r, zero), torch.where(real, v, zero), torch.where(real, d.to(r.dtype), zero)
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        keep = 1.0 - d[:, t]
        delta = r[:, t] + gamma * keep * next_value - v[:, t]
        # a padded step is invisible: the later value and advantage pass through it
        running = torch.where(real[:, t], delta + gamma * lam * keep * running, running)
        next_value = torch.where(real[:, t], v[:, t], next_value)
        adv[:, t] = torch.where(real[:, t], running, zero[:, t])
    returns = (adv + v) * m
    return (adv[0], returns[0]) if one_d else (adv, returns)
