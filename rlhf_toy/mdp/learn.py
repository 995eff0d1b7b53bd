"""Sampling episodes and learning from them: returns, action selection, SARSA, Q-learning.

Shapes: S states, A actions, T steps of an episode, B episodes. Trajectory
fields use the names of the token code: `states`, `actions`, `rewards`, `dones`,
`mask`; `discounted_returns` IS `rlhf_toy.core.discounted_returns` (numpy in, numpy out).
Equation numbers are Sutton & Barto, Reinforcement Learning (2nd ed., 2018).

A `seed` argument is an int or a `np.random.Generator` (used as is), so that runs
are reproducible and several calls can share one stream.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rlhf_toy.core import discounted_returns as _torch_discounted_returns
from rlhf_toy.mdp.solve import check_policy
from rlhf_toy.mdp.tabular import TabularMDP


class Trajectory(NamedTuple):
    """Episodes sampled from an MDP: (T,) for one, (B, T) padded for a batch.

    Step t is (s_t, a_t, r_{t+1}, s_{t+1}); padding (after the end of a shorter
    episode) has mask 0, states/actions 0 and rewards/dones 0.
    """

    states: np.ndarray  # int, s_t
    actions: np.ndarray  # int, a_t ~ pi(. | s_t)
    rewards: np.ndarray  # float, R[s_t, a_t, s_{t+1}]
    dones: np.ndarray  # float, 1 where s_{t+1} is terminal (episode ended after step t)
    next_states: np.ndarray  # int, s_{t+1}
    mask: np.ndarray  # float, 1 = real step, 0 = padding


class TDResult(NamedTuple):
    """Output of `sarsa` and `q_learning`."""

    q: np.ndarray  # (S, A) learned action values
    returns: np.ndarray  # (episodes,) discounted return G_0 of each training episode


def discounted_returns(rewards, dones, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * (1 - done_t) * G_{t+1}: `rlhf_toy.core.discounted_returns` on numpy.

    The one implementation lives in core; this converts at the boundary (float64).

    Args:
        rewards, dones: (T,) or (B, T) arrays.
        gamma: discount.
    Returns:
        returns: float array, same shape as `rewards`.
    """
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    d = torch.as_tensor(np.asarray(dones, dtype=np.float64))
    return _torch_discounted_returns(r, d, gamma).numpy()


def _sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of (B, K) probabilities by inverse CDF. Returns (B,) int."""
    cdf = np.cumsum(probs, axis=1)  # (B, K)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]  # scale: rows sum to 1 up to rounding
    return np.minimum((cdf <= u).sum(axis=1), probs.shape[1] - 1)


def sample_trajectories(mdp: TabularMDP, policy, n: int, seed=None,
                        max_steps: int = 1_000) -> Trajectory:
    """Sample `n` episodes in parallel (vectorized over episodes).

    Each starts from s_0 ~ initial and runs until a terminal state is entered
    (done = 1 on that step) or `max_steps` steps (then truncated: no done).

    Args:
        policy: (S, A) probabilities pi(a | s).
        n: number of episodes B.
        seed: int or np.random.Generator.
        max_steps: length limit T_max.
    Returns:
        Trajectory of (B, T) arrays, T = length of the longest episode.
    """
    policy = check_policy(mdp, policy)
    rng = np.random.default_rng(seed)
    state = _sample_rows(np.broadcast_to(mdp.initial, (n, mdp.n_states)), rng)  # (B,)
    alive = np.ones(n, dtype=bool)
    cols = {k: [] for k in Trajectory._fields}
    for _ in range(max_steps):
        if not alive.any():
            break
        action = _sample_rows(policy[state], rng)  # (B, A) -> (B,)
        nxt = _sample_rows(mdp.P[state, action], rng)  # (B, S) -> (B,)
        done = mdp.terminal[nxt] & alive
        for key, val in (("states", state), ("actions", action), ("next_states", nxt)):
            cols[key].append(np.where(alive, val, 0))
        cols["rewards"].append(np.where(alive, mdp.R[state, action, nxt], 0.0))
        cols["dones"].append(done.astype(float))
        cols["mask"].append(alive.astype(float))
        alive = alive & ~done
        state = nxt
    return Trajectory(**{k: np.stack(v, axis=1) if v else np.zeros((n, 0), dtype=int)
                         for k, v in cols.items()})


def sample_trajectory(mdp: TabularMDP, policy, seed=None, max_steps: int = 1_000) -> Trajectory:
    """Sample one episode: `sample_trajectories` with n = 1, padding removed.

    Returns:
        Trajectory of (T,) arrays (mask all ones).
    """
    batch = sample_trajectories(mdp, policy, 1, seed=seed, max_steps=max_steps)
    return Trajectory(*(x[0] for x in batch))


def epsilon_greedy_probs(q, epsilon: float) -> np.ndarray:
    """pi(a|s) = epsilon / A + (1 - epsilon) * [a is greedy] / (number of greedy actions).

    Args:
        q: (A,) or (S, A) action values.
        epsilon: exploration probability in [0, 1].
    Returns:
        probabilities, same shape as q.
    """
    q = np.asarray(q, dtype=float)
    greedy = (q == q.max(axis=-1, keepdims=True)).astype(float)
    greedy /= greedy.sum(axis=-1, keepdims=True)
    return epsilon / q.shape[-1] + (1.0 - epsilon) * greedy


def boltzmann_probs(q, temperature: float) -> np.ndarray:
    """Softmax action probabilities pi(a|s) = exp(q/tau) / sum_b exp(q_b/tau) (S & B eq. 13.2).

    Args:
        q: (A,) or (S, A); temperature tau > 0.
    Returns:
        probabilities, same shape as q.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = np.asarray(q, dtype=float) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))  # shift for stability
    return z / z.sum(axis=-1, keepdims=True)


def epsilon_greedy(q_row, epsilon: float, rng: np.random.Generator) -> int:
    """Pick an action: uniform with probability epsilon, else greedy (ties broken at random).

    Args:
        q_row: (A,) action values of the current state.
    Returns:
        action index.
    """
    q_row = np.asarray(q_row)
    if rng.random() < epsilon:
        return int(rng.integers(len(q_row)))
    best = np.flatnonzero(q_row == q_row.max())
    return int(best[0] if len(best) == 1 else rng.choice(best))


def boltzmann(q_row, temperature: float, rng: np.random.Generator) -> int:
    """Pick an action from the softmax of q_row / temperature. Returns an action index."""
    probs = boltzmann_probs(q_row, temperature)
    return int(_sample_rows(probs[None], rng)[0])


def _episode_returns(rewards: list[list[float]], gamma: float) -> np.ndarray:
    """G_0 of each episode via discounted_returns on a zero-padded (B, T) batch."""
    width = max((len(r) for r in rewards), default=0)
    padded = np.zeros((len(rewards), max(width, 1)))  # (B, T)
    for i, r in enumerate(rewards):
        padded[i, :len(r)] = r
    return discounted_returns(padded, np.zeros_like(padded), gamma)[:, 0]


def _td_control(mdp: TabularMDP, episodes: int, alpha: float, epsilon: float, seed,
                max_steps: int, off_policy: bool) -> TDResult:
    """Shared loop of SARSA (on-policy target) and Q-learning (greedy target)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1]; got {epsilon}")
    rng = np.random.default_rng(seed)
    q = np.zeros((mdp.n_states, mdp.n_actions))  # terminal rows stay 0: value 0
    all_rewards = []
    for _ in range(episodes):
        state = int(_sample_rows(mdp.initial[None], rng)[0])
        action = epsilon_greedy(q[state], epsilon, rng)
        rewards = []
        for _ in range(max_steps):
            nxt, reward = mdp.step(state, action, rng)
            rewards.append(reward)
            next_action = epsilon_greedy(q[nxt], epsilon, rng)
            if mdp.terminal[nxt]:
                target = reward
            elif off_policy:
                target = reward + mdp.gamma * q[nxt].max()  # eq. 6.8
            else:
                target = reward + mdp.gamma * q[nxt, next_action]  # eq. 6.7
            q[state, action] += alpha * (target - q[state, action])
            if mdp.terminal[nxt]:
                break
            state, action = nxt, next_action
        all_rewards.append(rewards)
    return TDResult(q, _episode_returns(all_rewards, mdp.gamma))


def sarsa(mdp: TabularMDP, episodes: int, alpha: float = 0.5, epsilon: float = 0.1,
          seed=None, max_steps: int = 10_000) -> TDResult:
    """On-policy TD control (S & B eq. 6.7), epsilon-greedy in Q, Q initialised to 0.

        Q(S, A) <- Q(S, A) + alpha [R + gamma Q(S', A') - Q(S, A)],  A' ~ eps-greedy(Q(S'))

    Args:
        episodes: number of training episodes.
        alpha: step size in (0, 1]; epsilon: exploration in [0, 1].
        seed: int or np.random.Generator.
        max_steps: per-episode length limit (a truncated episode just stops).
    Returns:
        TDResult(q (S, A), returns (episodes,) online discounted return of each episode).
    """
    return _td_control(mdp, episodes, alpha, epsilon, seed, max_steps, off_policy=False)


def q_learning(mdp: TabularMDP, episodes: int, alpha: float = 0.5, epsilon: float = 0.1,
               seed=None, max_steps: int = 10_000) -> TDResult:
    """Off-policy TD control (S & B eq. 6.8), behaving epsilon-greedy in Q.

        Q(S, A) <- Q(S, A) + alpha [R + gamma max_a Q(S', a) - Q(S, A)]

    Arguments and returns as `sarsa`.
    """
    return _td_control(mdp, episodes, alpha, epsilon, seed, max_steps, off_policy=True)


def greedy_rollout(mdp: TabularMDP, q, max_steps: int = 1_000) -> Trajectory:
    """Follow argmax_a q(s, a) (lowest index on ties) from the most likely start state.

    Deterministic for a deterministic MDP (the next state is the most likely one).

    Returns:
        Trajectory of (T,) arrays; T = max_steps if the greedy policy never terminates.
    """
    q = np.asarray(q, dtype=float)
    state = int(np.argmax(mdp.initial))
    steps = []
    for _ in range(max_steps):
        action = int(np.argmax(q[state]))
        nxt = int(np.argmax(mdp.P[state, action]))
        done = bool(mdp.terminal[nxt])
        steps.append((state, action, mdp.R[state, action, nxt], float(done), nxt, 1.0))
        if done:
            break
        state = nxt
    cols = list(zip(*steps, strict=True))
    return Trajectory(*(np.array(c) for c in cols))
