"""Dynamic programming on a TabularMDP: exact and iterative evaluation, VI, PI.

Shapes: S states, A actions. A `policy` is an (S, A) array of probabilities
pi(a | s); `values` is (S,); `q` is (S, A). Terminal states have value 0.
Equation numbers are Sutton & Barto, Reinforcement Learning (2nd ed., 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from rlhf_toy.mdp.tabular import TabularMDP, _check_distribution


class Evaluation(NamedTuple):
    """Result of iterative policy evaluation."""

    values: np.ndarray  # (S,) V after the last sweep
    n_iter: int  # number of sweeps done
    delta: float  # max_s |V_k(s) - V_{k-1}(s)| of the last sweep


class Solution(NamedTuple):
    """An optimal (or, for `policy_iteration`, a policy-stable) solution."""

    values: np.ndarray  # (S,) V*
    q: np.ndarray  # (S, A) Q*
    policy: np.ndarray  # (S, A) deterministic greedy policy (one-hot rows)
    n_iter: int  # sweeps (value iteration) or improvement steps (policy iteration)


def check_policy(mdp: TabularMDP, policy) -> np.ndarray:
    """Validate and return `policy` as an (S, A) float array whose rows sum to 1."""
    policy = np.asarray(policy, dtype=float)
    if policy.shape != (mdp.n_states, mdp.n_actions):
        raise ValueError(f"policy must have shape (S, A) = {(mdp.n_states, mdp.n_actions)}; "
                         f"got {policy.shape}")
    _check_distribution(policy, "policy")
    return policy


def policy_dynamics(mdp: TabularMDP, policy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P_pi[s, s'] = sum_a pi(a|s) P[s, a, s'] and r_pi[s] = sum_a pi(a|s) r(s, a).

    Returns:
        (P_pi (S, S), r_pi (S,)).
    """
    P_pi = np.einsum("sa,sat->st", policy, mdp.P)  # (S, A) x (S, A, S) -> (S, S)
    r_pi = (policy * mdp.expected_reward).sum(axis=1)  # (S, A) -> (S,)
    return P_pi, r_pi


def policy_evaluation(mdp: TabularMDP, policy) -> np.ndarray:
    """V_pi by solving the Bellman expectation equation exactly (S & B eq. 4.4).

        V = r_pi + gamma P_pi V   on non-terminal states, V = 0 on terminal ones,
        i.e. (I - gamma P_pi[N, N]) V[N] = r_pi[N] with N the non-terminal states.

    Args:
        mdp: the MDP.
        policy: (S, A) probabilities.
    Returns:
        values: (S,).
    Raises:
        ValueError if the system is singular: with gamma = 1, a policy that from some
        state never reaches a terminal state has no finite value.
    """
    policy = check_policy(mdp, policy)
    P_pi, r_pi = policy_dynamics(mdp, policy)
    live = ~mdp.terminal
    system = np.eye(live.sum()) - mdp.gamma * P_pi[np.ix_(live, live)]  # (N, N)
    if np.linalg.cond(system) > 1e12:
        raise ValueError("policy never reaches a terminal state from some state, so with "
                         f"gamma = {mdp.gamma:g} its value is not finite")
    values = np.zeros(mdp.n_states)
    values[live] = np.linalg.solve(system, r_pi[live])
    return values


def q_from_v(mdp: TabularMDP, values) -> np.ndarray:
    """Q(s, a) = sum_s' P[s, a, s'] (R[s, a, s'] + gamma V(s'))  (S & B eq. 4.6).

    Args:
        values: (S,); entries of terminal states are treated as 0.
    Returns:
        q: (S, A), zero on terminal states.
    """
    values = np.where(mdp.terminal, 0.0, np.asarray(values, dtype=float))
    q = mdp.expected_reward + mdp.gamma * mdp.P @ values  # (S, A, S) @ (S,) -> (S, A)
    q[mdp.terminal] = 0.0
    return q


def iterative_policy_evaluation(mdp: TabularMDP, policy, tol: float = 1e-10,
                                max_iter: int = 10_000) -> Evaluation:
    """V_pi by repeated synchronous sweeps of the Bellman expectation backup (S & B eq. 4.5).

        V_{k+1}(s) = sum_a pi(a|s) sum_s' P[s, a, s'] (R[s, a, s'] + gamma V_k(s')),  V_0 = 0

    Stops when max_s |V_{k+1} - V_k| < tol or after `max_iter` sweeps, so `max_iter=k`
    gives the k-th iterate (S & B Figure 4.1).

    Args:
        policy: (S, A) probabilities.
        tol: stopping threshold on the sup-norm change.
        max_iter: maximum number of sweeps.
    Returns:
        Evaluation(values (S,), n_iter, delta); check `delta < tol` for convergence.
    """
    policy = check_policy(mdp, policy)
    P_pi, r_pi = policy_dynamics(mdp, policy)
    values = np.zeros(mdp.n_states)
    delta = np.inf
    for k in range(1, max_iter + 1):
        new = np.where(mdp.terminal, 0.0, r_pi + mdp.gamma * P_pi @ values)  # (S, S) @ (S,)
        delta = float(np.max(np.abs(new - values)))
        values = new
        if delta < tol:
            return Evaluation(values, k, delta)
    return Evaluation(values, max_iter, delta)


def greedy_policy(q, atol: float = 1e-8) -> np.ndarray:
    """Deterministic greedy policy: one-hot on argmax_a q(s, a).

    Ties (within `atol` of the maximum) go to the lowest action index, so two
    solvers that agree on Q up to rounding also agree on the policy.

    Args:
        q: (S, A).
    Returns:
        policy: (S, A) one-hot rows.
    """
    q = np.asarray(q, dtype=float)
    best = np.argmax(q >= q.max(axis=1, keepdims=True) - atol, axis=1)  # (S,) first near-max
    return np.eye(q.shape[1])[best]


def value_iteration(mdp: TabularMDP, tol: float = 1e-10, max_iter: int = 100_000) -> Solution:
    """Optimal values by the Bellman optimality backup (S & B eq. 4.10).

        V_{k+1}(s) = max_a sum_s' P[s, a, s'] (R[s, a, s'] + gamma V_k(s')),  V_0 = 0

    Args:
        tol: stop when max_s |V_{k+1} - V_k| < tol.
        max_iter: maximum number of sweeps.
    Returns:
        Solution(values V* (S,), q Q* (S, A), policy greedy in Q* (S, A), n_iter).
    Raises:
        RuntimeError if it has not converged after `max_iter` sweeps.
    """
    values = np.zeros(mdp.n_states)
    for k in range(1, max_iter + 1):
        q = q_from_v(mdp, values)  # (S, A)
        new = q.max(axis=1)
        delta = float(np.max(np.abs(new - values)))
        values = new
        if delta < tol:
            q = q_from_v(mdp, values)
            return Solution(values, q, greedy_policy(q), k)
    raise RuntimeError(f"value iteration did not converge in {max_iter} sweeps "
                       f"(last change {delta:.3g} >= tol {tol:g})")


def policy_iteration(mdp: TabularMDP, policy=None, max_iter: int = 1_000,
                     atol: float = 1e-8) -> Solution:
    """Policy iteration (S & B section 4.3): exact evaluation, then greedy improvement.

    The improvement keeps the current action whenever it is within `atol` of the best
    one, so the loop cannot cycle between equally good policies.

    Args:
        policy: (S, A) initial policy; default uniform random (proper whenever every
            state can reach a terminal state, as gamma = 1 requires).
        max_iter: maximum number of improvement steps.
    Returns:
        Solution(values V* (S,), q Q* (S, A), policy (S, A) one-hot, n_iter).
    """
    if policy is None:
        policy = np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.n_actions)
    policy = check_policy(mdp, policy)
    for k in range(1, max_iter + 1):
        values = policy_evaluation(mdp, policy)
        q = q_from_v(mdp, values)
        new = greedy_policy(q, atol)
        # keep the old action where it is still (near-)greedy: the stability test of PI
        old = np.argmax(policy, axis=1)
        old_ok = q[np.arange(mdp.n_states), old] >= q.max(axis=1) - atol
        is_det = np.isclose(policy.max(axis=1), 1.0)
        new[old_ok & is_det] = policy[old_ok & is_det]
        if np.array_equal(new, policy):
            return Solution(values, q, new, k)
        policy = new
    raise RuntimeError(f"policy iteration did not stabilise in {max_iter} steps")
