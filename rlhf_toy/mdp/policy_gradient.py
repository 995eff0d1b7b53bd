"""Policy gradients for a tabular softmax policy: the REINFORCE estimate and the exact value.

Shapes: S states, A actions, B episodes, T steps. `theta` is (S, A) and the policy is
pi(a | s) = softmax(theta[s])_a (S & B eq. 13.2). The objective is
J(theta) = sum_s initial(s) V_pi(s), the expected discounted return from the start.
Equation numbers are Sutton & Barto, Reinforcement Learning (2nd ed., 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from rlhf_toy.mdp.learn import discounted_returns, sample_trajectories
from rlhf_toy.mdp.solve import policy_dynamics, policy_evaluation, q_from_v
from rlhf_toy.mdp.tabular import TabularMDP


class GradientEstimate(NamedTuple):
    """Monte Carlo estimate of grad J(theta)."""

    grad: np.ndarray  # (S, A) mean over episodes
    stderr: np.ndarray  # (S, A) standard error of that mean (std / sqrt(B))


def softmax_policy(theta) -> np.ndarray:
    """pi(a | s) = exp(theta[s, a]) / sum_b exp(theta[s, b]) (S & B eq. 13.2). (S, A) -> (S, A)."""
    z = np.asarray(theta, dtype=float)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _check_theta(mdp: TabularMDP, theta) -> np.ndarray:
    theta = np.asarray(theta, dtype=float)
    if theta.shape != (mdp.n_states, mdp.n_actions):
        raise ValueError(f"theta must have shape (S, A) = {(mdp.n_states, mdp.n_actions)}; "
                         f"got {theta.shape}")
    return theta


def reinforce_gradient_estimate(mdp: TabularMDP, theta, n_episodes: int, seed=None,
                                max_steps: int = 1_000) -> GradientEstimate:
    """REINFORCE (S & B eq. 13.8 and the episodic pseudo-code of section 13.3).

        grad J = E[ sum_t gamma^t G_t grad log pi(A_t | S_t) ],
        grad_theta[s, .] log pi(a | s) = onehot(a) - pi(. | s)   for the softmax policy.

    Each episode gives one sample of the bracket; the estimate is their mean.

    Args:
        theta: (S, A) softmax parameters.
        n_episodes: number of episodes B.
        seed: int or np.random.Generator.
        max_steps: per-episode length limit.
    Returns:
        GradientEstimate(grad (S, A), stderr (S, A)).
    """
    theta = _check_theta(mdp, theta)
    pi = softmax_policy(theta)
    traj = sample_trajectories(mdp, pi, n_episodes, seed=seed, max_steps=max_steps)
    returns = discounted_returns(traj.rewards, traj.dones, mdp.gamma)  # (B, T)
    discount = mdp.gamma ** np.arange(traj.rewards.shape[1])  # (T,)
    weight = discount * returns * traj.mask  # (B, T): gamma^t G_t on real steps
    B, S, A = n_episodes, mdp.n_states, mdp.n_actions
    per_episode = np.zeros((B, S, A))
    rows = np.broadcast_to(np.arange(B)[:, None], traj.states.shape)  # (B, T)
    # + weight * onehot(a_t) at [b, s_t, a_t]
    np.add.at(per_episode, (rows, traj.states, traj.actions), weight)
    # - weight * pi(. | s_t) over the row [b, s_t, :]
    np.add.at(per_episode, (rows, traj.states), -weight[..., None] * pi[traj.states])
    grad = per_episode.mean(axis=0)
    stderr = per_episode.std(axis=0, ddof=1) / np.sqrt(B)
    return GradientEstimate(grad, stderr)


def discounted_visitation(mdp: TabularMDP, policy) -> np.ndarray:
    """d(s) = sum_t gamma^t Pr(S_t = s) from the start distribution (S & B eq. 9.2 / 13.5).

    Solves d^T (I - gamma P_pi) = initial^T on non-terminal states (d = 0 on terminal ones).
    Not normalized: sum_s d(s) is the expected discounted episode length.

    Args:
        policy: (S, A) probabilities.
    Returns:
        d: (S,).
    """
    P_pi, _ = policy_dynamics(mdp, np.asarray(policy, dtype=float))
    live = ~mdp.terminal
    system = np.eye(live.sum()) - mdp.gamma * P_pi[np.ix_(live, live)]  # (N, N)
    d = np.zeros(mdp.n_states)
    d[live] = np.linalg.solve(system.T, mdp.initial[live])
    return d


def exact_policy_gradient(mdp: TabularMDP, theta) -> np.ndarray:
    """grad J(theta) by the policy-gradient theorem (S & B eq. 13.5), computed exactly.

        grad J = sum_s d(s) sum_a Q(s, a) grad pi(a | s)
        => dJ/dtheta[s, b] = d(s) pi(b | s) (Q(s, b) - V(s))    for the softmax policy,

    since sum_a pi(a|s) Q(s,a) (onehot(a) - pi(.|s))_b = pi(b|s) (Q(s,b) - V(s)),
    with d the discounted visitation (`discounted_visitation`) and V, Q exact.

    Args:
        theta: (S, A).
    Returns:
        grad: (S, A).
    """
    theta = _check_theta(mdp, theta)
    pi = softmax_policy(theta)
    values = policy_evaluation(mdp, pi)  # (S,)
    q = q_from_v(mdp, values)  # (S, A)
    d = discounted_visitation(mdp, pi)  # (S,)
    return d[:, None] * pi * (q - values[:, None])


def objective(mdp: TabularMDP, theta) -> float:
    """J(theta) = sum_s initial(s) V_pi(s) for pi = softmax(theta)."""
    values = policy_evaluation(mdp, softmax_policy(_check_theta(mdp, theta)))
    return float(mdp.initial @ values)
