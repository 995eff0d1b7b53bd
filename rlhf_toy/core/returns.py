"""Returns, advantages and masked statistics.

Shapes: B batch, T time (response tokens, or steps of a tabular episode).

`mask[b, t] = 1` marks a real step, 0 padding; float or bool masks are accepted, and
padding may hold anything (even inf or NaN): it never reaches a real result.
`dones[b, t] = 1` means the episode ends after step t: nothing is bootstrapped past it.
"""

from __future__ import annotations

import torch


def _float(x: torch.Tensor) -> torch.Tensor:
    """`x` itself if floating point, else as float32 (int rewards, bool dones)."""
    return x if x.is_floating_point() else x.float()


def _zero_padding(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`x` with padding replaced by 0, so garbage there cannot leak (not even as 0 * inf)."""
    return torch.where(real, x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over real positions only (never divides by padding).

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as `x`, 1 = real (float or bool).
        dim: reduce over this dim; None reduces over everything.
    Returns:
        scalar (dim None), or `x` reduced over `dim` (e.g. (B, T) -> (B,) for dim=-1).
        A slice without any real element has mean 0.
    """
    m = _float(mask).to(_float(x).dtype)
    x = _zero_padding(_float(x), mask.bool())
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all real positions.

        var = sum_real (x - mean)^2 / (n - 1)      (n with unbiased=False)

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape, 1 = real.
        unbiased: divide by n - 1 (Bessel's correction) instead of n.
    Returns:
        scalar. With fewer real elements than the divisor needs (n < 2 unbiased, n < 1
        biased) the variance is defined as 0, never NaN: one sample has no spread.
    """
    m = _float(mask).to(_float(x).dtype)
    real = mask.bool()
    centered = _zero_padding(_float(x) - masked_mean(x, mask), real)
    n = m.sum()
    denom = (n - 1.0) if unbiased else n
    return (centered.pow(2) * m).sum() / denom.clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Normalize by the masked mean and variance over all real positions.

        out = (x - mean) / sqrt(var + eps)          (+ mean again if not shift_mean)

    As TRL's `masked_whiten`: with `shift_mean=False` the mean is added back, so only the
    scale changes. A constant tensor gives 0 (or the constant), never a division by zero.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape, 1 = real.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.
    Returns:
        same shape as `x`; padding positions are 0.
    """
    real = mask.bool()
    x = _zero_padding(_float(x), real)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_padding(out, real)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real position of each row, for left- or right-padded masks.

    Examples: [1, 1, 0, 0] -> 1 (right padding), [0, 0, 1, 1] -> 3 (left padding),
    [0, 1, 0, 1, 0] -> 3 (any mask: the largest t with mask 1).

    Args:
        mask: (B, T), 1 = real.
    Returns:
        (B,) long. A row without any real position gets 0 (a valid index, so gathers do
        not fail; callers that care check `mask.sum(-1) > 0`).
    """
    t = mask.shape[-1]
    flipped = mask.flip(-1).bool().long()  # (B, T), reversed in time
    first_from_right = flipped.argmax(-1)  # (B,): argmax returns the first maximal index
    return (t - 1 - first_from_right) * flipped.any(-1).long()


def _as_2d(*xs: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """(T,) inputs become (1, T): the tabular code passes single episodes."""
    one_d = xs[0].dim() == 1
    return one_d, [x.unsqueeze(0) if one_d else x for x in xs]


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return of every step (Sutton & Barto eq. 3.9), computed backwards in time:

        G_t = r_t + gamma * (1 - done_t) * G_{t+1},     G_T = 0

    Args:
        rewards: (B, T) or (T,); int rewards are promoted to float32.
        dones: same shape, 0/1 (float or bool); nothing after a done reaches G_t.
        gamma: discount in [0, 1].
    Returns:
        returns: same shape as `rewards`.
    """
    one_d, (r, d) = _as_2d(_float(rewards), dones)
    done = d.bool()
    out = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])  # (B,): G_{t+1}
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + _zero_padding(gamma * running, ~done[:, t])
        out[:, t] = running
    return out[0] if one_d else out


def _next_real_values(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """values[b, s] at the first real s > t for each (b, t), or 0 where no real step follows.

    Args:
        values: (B, T), 0 on padding.
        real: (B, T) bool.
    Returns:
        (B, T).
    """
    b, t = values.shape
    steps = torch.arange(t, device=values.device).expand(b, t)  # (B, T)
    index = torch.where(real, steps, torch.full_like(steps, t))  # padding -> "none" (T)
    first_real_from = index.flip(-1).cummin(-1).values.flip(-1)  # (B, T): first real s >= t
    following = torch.cat([first_real_from[:, 1:], index.new_full((b, 1), t)], dim=1)  # s > t
    padded = torch.cat([values, values.new_zeros(b, 1)], dim=1)  # (B, T + 1), column T is 0
    return padded.gather(1, following)  # (B, T)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float,
        lam: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using GAE", eqs. 11-16), backwards in time:

        delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        returns = A + V

    `lam = 1` gives discounted_returns - values; `lam = 0` the one-step TD error. The value
    after the last step is taken as 0 (a row that runs to the end without a done is treated
    as ending there). Values after a done are never read.

    Args:
        rewards, values: (B, T) or (T,).
        dones: same shape, 0/1 (float or bool).
        gamma, lam: discount and GAE parameter, in [0, 1].
        mask: optional, same shape, 1 = real. A padded step is invisible: its reward,
            value and done are ignored, and the next real step's value and advantage pass
            through it unchanged (so padding anywhere, not only at the ends, is harmless).
    Returns:
        (advantages, returns), each the shape of `rewards`; 0 on padding.
    """
    one_d, (r, v, d) = _as_2d(_float(rewards), _float(values), dones)
    if mask is None:
        real = torch.ones_like(r, dtype=torch.bool)
    else:
        real = (mask.unsqueeze(0) if one_d else mask).bool()
    r, v = _zero_padding(r, real), _zero_padding(v, real)
    keep = ~(d.bool() & real)  # (B, T): bootstrap past step t
    # every TD error at once (the same elementwise ops as step by step, so the same bits);
    # only the lam-recursion below runs over time
    next_value = _next_real_values(v, real)  # (B, T): V of the next real step, 0 if none
    delta = r + _zero_padding(gamma * next_value, keep) - v  # (B, T)
    running = r.new_zeros(r.shape[0])  # (B,): A_{t+1}
    columns = []
    for t in reversed(range(r.shape[1])):
        step = delta[:, t] + _zero_padding(gamma * lam * running, keep[:, t])
        running = torch.where(real[:, t], step, running)
        columns.append(running)
    adv = (_zero_padding(torch.stack(columns[::-1], dim=1), real) if columns
           else torch.zeros_like(r))  # T x (B,) -> (B, T)
    returns = _zero_padding(adv + v, real)
    return (adv[0], returns[0]) if one_d else (adv, returns)
