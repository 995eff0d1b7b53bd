"""The token-level MDP of RLHF, small enough to enumerate, and its exact KL-regularized optimum.

Shapes: V vocabulary size. Token ids are ints 0..V-1 and `eos_id` is one of them.

    state       prompt + response prefix, a tuple of token ids
    action      the next token a in 0..V-1
    transition  deterministic: state -> state + (a,)
    done        after EOS, or once the response has `max_len` tokens (cut, no EOS at the end)
    reward      reward(response) on the final step only, 0 before it; gamma = 1

A response is a tuple of token ids, ending with EOS unless cut at `max_len`. A policy is
a function state -> (V,) next-token probabilities (`ref_next_probs` is pi_ref); its
sequence distribution is a dict response -> probability, the product of the per-token
probabilities. Tokens of zero probability are never expanded, so only the support of the
policy is enumerated (at most V**max_len leaves).

RLHF maximizes the KL-regularized objective (Ziegler et al. 2019: the reward minus
beta log pi(y)/pi_ref(y); Rafailov et al. 2023, eq. 3)

    J(pi) = E_{y ~ pi}[r(y)] - beta KL(pi || pi_ref),

whose maximizer is pi*(y) = pi_ref(y) exp(r(y) / beta) / Z (Rafailov et al. 2023, eq. 4)
with value J* = beta log Z, Z = E_{y ~ pi_ref}[exp(r(y) / beta)]. Token by token, pi* is
given by the soft (log-sum-exp) Bellman backup over the prefix tree:

    Q(s, a)    = r(response of s + a)  if s + a is complete,  else V(s + a)
    V(s)       = beta log sum_a pi_ref(a | s) exp(Q(s, a) / beta)
    pi*(a | s) = pi_ref(a | s) exp((Q(s, a) - V(s)) / beta)

and V(prompt) = J*. Here V(s) is a soft value; Q is -inf on tokens with pi_ref(a | s) = 0
(never taken, subtree not expanded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import numpy as np

Tokens = tuple[int, ...]
NextProbs = Callable[[Tokens], np.ndarray]  # state -> (V,) next-token probabilities

_ATOL = 1e-8


def _check_beta(beta) -> float:
    beta = float(beta)
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (the KL coefficient); got {beta}")
    return beta


def _logsumexp(z: np.ndarray) -> float:
    """log sum exp(z), stable; -inf entries contribute 0. (V,) -> scalar."""
    m = float(np.max(z))
    if m == -np.inf:
        return m
    return m + float(np.log(np.sum(np.exp(z - m))))


def _check_response_dist(probs: dict, name: str) -> None:
    values = np.array(list(probs.values()), dtype=np.float64)
    if np.any(values < -_ATOL) or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must map responses to finite non-negative probabilities")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 over responses; it sums to {values.sum():.6g}")


class TokenMDP:
    """The MDP of one prompt's response: append tokens until EOS or `max_len`.

    Args:
        vocab_size: V >= 2, number of token ids.
        eos_id: the end-of-sequence token, in 0..V-1.
        max_len: maximum response length in tokens (EOS included), >= 1.
        ref_next_probs: pi_ref, a function state -> (V,) next-token probabilities, where
            state = prompt + response prefix. Give EOS probability 0 on the prompt to
            forbid the empty response (EOS as the first token); zero-probability tokens
            are simply never taken.
        reward: a function response -> float, paid on the final step only.
        prompt: the fixed start of every state (default empty).
        token_names: optional labels used by `describe()`.

    Raises:
        ValueError naming the argument and what is allowed.
    """

    def __init__(self, vocab_size: int, eos_id: int, max_len: int, ref_next_probs: NextProbs,
                 reward: Callable[[Tokens], float], prompt: Sequence[int] = (),
                 token_names: Sequence[str] | None = None):
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size must be >= 2 (EOS and one more token); got {vocab_size}")
        if not 0 <= int(eos_id) < int(vocab_size):
            raise ValueError(f"eos_id must be in [0, {int(vocab_size) - 1}]; got {eos_id}")
        if int(max_len) < 1:
            raise ValueError(f"max_len must be >= 1; got {max_len}")
        if not (callable(ref_next_probs) and callable(reward)):
            raise ValueError("ref_next_probs and reward must be callables (state -> probs, "
                             "response -> float)")
        self.vocab_size, self.eos_id, self.max_len = int(vocab_size), int(eos_id), int(max_len)
        self.ref_next_probs, self.reward = ref_next_probs, reward
        self.prompt = tuple(int(t) for t in prompt)
        if any(not 0 <= t < self.vocab_size for t in self.prompt):
            raise ValueError(f"prompt must hold token ids in [0, {self.vocab_size - 1}]; "
                             f"got {self.prompt}")
        if token_names is None:
            token_names = [str(t) for t in range(self.vocab_size)]
        if len(token_names) != self.vocab_size:
            raise ValueError(f"token_names must have {self.vocab_size} entries; "
                             f"got {len(token_names)}")
        self.token_names = [str(n) for n in token_names]

    def is_done(self, response: Tokens) -> bool:
        """True when `response` is complete: it ends with EOS or has `max_len` tokens."""
        return len(response) >= self.max_len or (len(response) > 0 and response[-1] == self.eos_id)

    def check_response(self, response) -> Tokens:
        """Validate and return `response` as a complete response (tuple of token ids)."""
        response = tuple(int(t) for t in response)
        ok = (1 <= len(response) <= self.max_len
              and all(0 <= t < self.vocab_size for t in response)
              and self.eos_id not in response[:-1] and self.is_done(response))
        if not ok:
            raise ValueError(f"{response} is not a complete response: token ids in "
                             f"[0, {self.vocab_size - 1}], EOS ({self.eos_id}) only at the end, "
                             f"ending with EOS or {self.max_len} tokens long")
        return response

    def next_probs(self, policy: NextProbs, state: Tokens) -> np.ndarray:
        """policy(state) as a validated (V,) float64 distribution."""
        probs = np.asarray(policy(state), dtype=np.float64)
        if probs.shape != (self.vocab_size,):
            raise ValueError(f"next-token probabilities must have shape (V,) = "
                             f"({self.vocab_size},); got {probs.shape} at state {state}")
        if not np.all(np.isfinite(probs)) or np.any(probs < -_ATOL):
            raise ValueError(f"next-token probabilities at state {state} must be finite and "
                             f"non-negative; got {probs}")
        if abs(probs.sum() - 1.0) > 1e-6:
            raise ValueError(f"next-token probabilities at state {state} must sum to 1; "
                             f"they sum to {probs.sum():.6g}")
        return np.clip(probs, 0.0, None)

    def score(self, response: Tokens) -> float:
        """reward(response) as a checked finite float."""
        r = float(self.reward(response))
        if not np.isfinite(r):
            raise ValueError(f"reward must be finite; got {r} for response {response}")
        return r

    def format(self, tokens: Tokens) -> str:
        """Token ids as their names, space-separated."""
        return " ".join(self.token_names[t] for t in tokens) if tokens else "(empty)"

    def __repr__(self) -> str:
        return (f"TokenMDP(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"max_len={self.max_len}, prompt={self.prompt})")

    def describe(self, max_rows: int = 40, precision: int = 3) -> str:
        """Every object of the MDP as text: tokens, pi_ref at each prefix, reward of each response.

        Only the support of pi_ref is listed; each table stops after `max_rows` rows.
        """
        table, responses = _expand(self, self.ref_next_probs)
        lines = [repr(self)]
        lines.append("tokens:  " + ", ".join(
            f"{t}:{n}" + ("*" if t == self.eos_id else "") for t, n in enumerate(self.token_names))
            + "   (* EOS: ends the episode)")
        lines.append(f"state = prompt + response prefix; action = next token; done at EOS or "
                     f"{self.max_len} tokens; reward(response) on the final step only")
        lines.append(f"prompt:  {self.format(self.prompt)}")
        lines.append(f"{len(table)} non-terminal states, {len(responses)} complete responses "
                     f"(support of pi_ref)")
        width = max(len(self.format(s[len(self.prompt):])) for s in table)
        with np.printoptions(precision=precision, suppress=True, linewidth=120):
            lines.append("pi_ref(a | prefix)  rows response prefixes, columns tokens:")
            for state in list(table)[:max_rows]:
                lines.append(f"  {self.format(state[len(self.prompt):]):<{width}}  {table[state]}")
        lines.append("complete responses y:  r(y)  pi_ref(y):")
        for y, p in list(responses.items())[:max_rows]:
            lines.append(f"  {self.format(y):<{width + 6}}  {self.score(y):.{precision}f}  "
                         f"{p:.{precision}g}")
        hidden = max(len(table), len(responses)) - max_rows
        if hidden > 0:
            lines.append(f"  ... ({hidden} more rows; raise max_rows)")
        return "\n".join(lines)

    __str__ = describe


def _expand(mdp: TokenMDP, policy: NextProbs) -> tuple[dict, dict]:
    """Walk the prefix tree under `policy`, skipping zero-probability tokens.

    Returns:
        (table: state -> (V,) probabilities at every reachable non-terminal state,
         responses: complete response -> probability), both sorted by key.
    """
    table, responses = {}, {}
    stack = [((), 1.0)]
    while stack:
        prefix, p = stack.pop()
        state = mdp.prompt + prefix
        probs = table[state] = mdp.next_probs(policy, state)  # (V,)
        for a in np.flatnonzero(probs > 0):
            child, p_child = prefix + (int(a),), p * float(probs[a])
            if mdp.is_done(child):
                responses[child] = p_child
            else:
                stack.append((child, p_child))
    return dict(sorted(table.items())), dict(sorted(responses.items()))


def sequence_probs(mdp: TokenMDP, next_probs: NextProbs) -> dict[Tokens, float]:
    """pi(y) = prod_t pi(y_t | prompt + y_<t) for every complete response y with pi(y) > 0.

    Args:
        mdp: the token MDP.
        next_probs: a per-token policy, state -> (V,) probabilities.
    Returns:
        dict response -> probability, summing to 1.
    """
    return _expand(mdp, next_probs)[1]


def enumerate_responses(mdp: TokenMDP) -> dict[Tokens, float]:
    """Every complete response with pi_ref(y) > 0, and pi_ref(y). See `sequence_probs`."""
    return sequence_probs(mdp, mdp.ref_next_probs)


class SoftSolution(NamedTuple):
    """The soft Bellman backup of the KL-regularized objective; keys are states."""

    values: dict  # state -> V(state), soft value (a float)
    q: dict  # state -> (V,) Q(state, a); -inf where pi_ref(a | state) = 0
    policy: dict  # state -> (V,) pi*(a | state) = pi_ref exp((Q - V) / beta)


def soft_bellman(mdp: TokenMDP, beta: float) -> SoftSolution:
    """Soft values, Q-values and the optimal per-token policy over the prefix tree.

        Q(s, a) = r(s + a) if s + a is complete else V(s + a)
        V(s) = beta log sum_a pi_ref(a | s) exp(Q(s, a) / beta)    (log-sum-exp, stable)
        pi*(a | s) = pi_ref(a | s) exp((Q(s, a) - V(s)) / beta)

    Args:
        mdp: the token MDP.
        beta: KL coefficient, > 0.
    Returns:
        SoftSolution(values, q, policy), each a dict over the non-terminal states reachable
        under pi_ref; values[mdp.prompt] = J*.
    Raises:
        ValueError if beta <= 0.
    """
    beta = _check_beta(beta)
    values, q, policy = {}, {}, {}

    def backup(prefix: Tokens) -> float:
        state = mdp.prompt + prefix
        ref = mdp.next_probs(mdp.ref_next_probs, state)  # (V,)
        q_s = np.full(mdp.vocab_size, -np.inf)
        for a in np.flatnonzero(ref > 0):
            child = prefix + (int(a),)
            q_s[a] = mdp.score(child) if mdp.is_done(child) else backup(child)
        with np.errstate(divide="ignore"):
            z = np.log(ref) + q_s / beta  # (V,) log of pi_ref exp(Q / beta)
        lse = _logsumexp(z)
        values[state], q[state], policy[state] = beta * lse, q_s, np.exp(z - lse)
        return beta * lse

    backup(())
    return SoftSolution(*(dict(sorted(d.items())) for d in (values, q, policy)))


def soft_policy(mdp: TokenMDP, beta: float) -> dict[Tokens, np.ndarray]:
    """pi*(. | state) for every non-terminal state: dict state -> (V,) probabilities.

    `soft_policy(mdp, beta).__getitem__` is itself a policy for `sequence_probs`.
    """
    return soft_bellman(mdp, beta).policy


def kl_regularized_optimum(mdp: TokenMDP, beta: float) -> dict[Tokens, float]:
    """argmax_pi E[r] - beta KL(pi || pi_ref), solved exactly by the soft Bellman backup.

    Equals the closed form pi*(y) = pi_ref(y) exp(r(y) / beta) / Z (Rafailov et al. 2023,
    eq. 4), built token by token from `soft_policy`.

    Args:
        mdp: the token MDP.
        beta: KL coefficient, > 0.
    Returns:
        dict complete response -> pi*(y), over the support of pi_ref, summing to 1.
    """
    policy = soft_policy(mdp, beta)
    return sequence_probs(mdp, policy.__getitem__)


def kl_regularized_value(mdp: TokenMDP, beta: float) -> float:
    """J* = max_pi J(pi) = beta log E_{y ~ pi_ref}[exp(r(y) / beta)], by enumeration (closed form).

    Args:
        beta: KL coefficient, > 0.
    Returns:
        J*, a float; equal to soft_bellman(mdp, beta).values[mdp.prompt].
    """
    beta = _check_beta(beta)
    ref = enumerate_responses(mdp)
    z = np.array([np.log(p) + mdp.score(y) / beta for y, p in ref.items()])  # (N,)
    return beta * _logsumexp(z)


def kl_divergence(p: dict, q: dict) -> float:
    """KL(p || q) = sum_y p(y) log(p(y) / q(y)) over response dicts; inf if p puts mass off q.

    Args:
        p, q: dicts response -> probability, each summing to 1 (missing keys are 0).
    Returns:
        KL in nats, a float >= 0 up to rounding.
    """
    _check_response_dist(p, "p")
    _check_response_dist(q, "q")
    total = 0.0
    for y, py in p.items():
        if py <= 0:
            continue
        qy = q.get(y, 0.0)
        if qy <= 0:
            return float("inf")
        total += py * (np.log(py) - np.log(qy))
    return float(total)


def objective(mdp: TokenMDP, response_probs: dict, beta: float) -> float:
    """J(pi) = E_{y ~ pi}[r(y)] - beta KL(pi || pi_ref), exactly (Rafailov et al. 2023, eq. 3).

    Args:
        mdp: the token MDP.
        response_probs: dict complete response -> pi(y), summing to 1 (e.g. `sequence_probs`).
        beta: KL coefficient, > 0.
    Returns:
        J(pi), a float; -inf if pi puts mass where pi_ref has none.
    """
    beta = _check_beta(beta)
    _check_response_dist(response_probs, "response_probs")
    expected_reward = sum(p * mdp.score(mdp.check_response(y))
                          for y, p in response_probs.items() if p > 0)
    return float(expected_reward - beta * kl_divergence(response_probs, enumerate_responses(mdp)))


class BigramReference:
    """pi_ref(a | state) = table[last token of state]; the empty state reads the EOS row.

    EOS doubles as the start-of-sequence context, as in GPT-2's <|endoftext|>; EOS is never
    the previous token inside a response, since it ends the episode.

    Args:
        table: (V, V) rows of next-token probabilities, indexed by the previous token.
        eos_id: row used for the empty state.
    """

    def __init__(self, table, eos_id: int):
        self.table, self.eos_id = np.asarray(table, dtype=np.float64), int(eos_id)

    def __call__(self, state: Tokens) -> np.ndarray:
        return self.table[state[-1] if state else self.eos_id]  # (V,)


def target_fraction(response: Tokens, target: int, eos_id: int) -> float:
    """Fraction of the response's non-EOS tokens equal to `target`, in [0, 1]; 0 if empty."""
    tokens = [t for t in response if t != eos_id]
    return sum(t == target for t in tokens) / len(tokens) if tokens else 0.0


def enumerable_task_mdp(n_tokens: int = 3, max_len: int = 3, target: int = 0, seed: int = 0,
                        concentration: float = 1.0) -> TokenMDP:
    """A tiny enumerable RLHF task: tokens a, b, c, ... plus EOS, a seeded bigram pi_ref.

    pi_ref is a `BigramReference` whose rows are Dirichlet(concentration) draws, except
    that EOS has probability 0 as the first token (no empty response). The reward is
    `target_fraction`: the fraction of response tokens equal to `target`, in [0, 1].
    With the defaults there are 3 + 9 + 27 = 39 complete responses (12 end with EOS,
    27 are cut at max_len = 3).

    Args:
        n_tokens: number of non-EOS tokens, 1..26; EOS is token id n_tokens.
        max_len: maximum response length (EOS included).
        target: the rewarded token, in 0..n_tokens-1.
        seed: seed of the reference table.
        concentration: Dirichlet concentration of each row (small = peaked pi_ref).
    Returns:
        TokenMDP with V = n_tokens + 1, eos_id = n_tokens, an empty prompt.
    """
    if not 1 <= n_tokens <= 26:
        raise ValueError(f"n_tokens must be in [1, 26]; got {n_tokens}")
    if not 0 <= target < n_tokens:
        raise ValueError(f"target must be a non-EOS token in [0, {n_tokens - 1}]; got {target}")
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0; got {concentration}")
    eos_id = n_tokens
    table = np.random.default_rng(seed).dirichlet(np.full(n_tokens + 1, float(concentration)),
                                                  size=n_tokens + 1)  # (V, V)
    table[eos_id, eos_id] = 0.0  # no EOS as the first token
    table[eos_id] /= table[eos_id].sum()
    names = [chr(ord("a") + i) for i in range(n_tokens)] + ["<eos>"]
    return TokenMDP(n_tokens + 1, eos_id, max_len, BigramReference(table, eos_id),
                    partial(target_fraction, target=target, eos_id=eos_id), token_names=names)
