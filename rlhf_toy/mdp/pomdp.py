"""Partial observability: a tabular POMDP, Bayes belief updates, and the tiger problem.

Shapes: S states, A actions, Z observations, N controller nodes.

    Omega[s', a, o] = Pr(o | a was taken and the state became s')        (S, A, Z)

The agent sees o, not s. The belief b(s) = Pr(S_t = s | history) is a sufficient
statistic (Kaelbling, Littman & Cassandra 1998, "Planning and acting in partially
observable stochastic domains", eq. for SE(b, a, o)):

    b'(s') = Omega[s', a, o] sum_s P[s, a, s'] b(s) / Pr(o | b, a).

What breaks when observations are treated as states: the observation process is not
Markov, so a policy of the current observation alone ("memoryless") cannot do what a
belief-based policy does. `memoryless_vs_belief` computes both values exactly for the
tiger problem by evaluating finite-state controllers on the (state, node) chain.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from rlhf_toy.mdp.tabular import TabularMDP, _check_distribution


class TabularPOMDP:
    """An MDP whose states are hidden behind observations.

    Args:
        mdp: the underlying TabularMDP (P, R, gamma, initial, terminal).
        Omega: (S, A, Z) observation probabilities Omega[s', a, o].
        initial_observation: (Z,) distribution of the first observation (seen before
            any action); default uniform, i.e. uninformative.
        observation_names: optional labels.
    """

    def __init__(self, mdp: TabularMDP, Omega, initial_observation=None, observation_names=None):
        Omega = np.array(Omega, dtype=float)
        if Omega.ndim != 3 or Omega.shape[:2] != (mdp.n_states, mdp.n_actions):
            raise ValueError(f"Omega must have shape (S, A, Z) with (S, A) = "
                             f"{(mdp.n_states, mdp.n_actions)}; got {Omega.shape}")
        _check_distribution(Omega, "Omega")
        Z = Omega.shape[2]
        if initial_observation is None:
            initial_observation = np.full(Z, 1.0 / Z)
        initial_observation = np.array(initial_observation, dtype=float)
        if initial_observation.shape != (Z,):
            raise ValueError(f"initial_observation must have shape (Z,) = ({Z},); "
                             f"got {initial_observation.shape}")
        _check_distribution(initial_observation, "initial_observation")
        self.mdp, self.Omega, self.initial_observation = mdp, Omega, initial_observation
        self.observation_names = (list(observation_names) if observation_names is not None
                                  else [str(o) for o in range(Z)])

    @property
    def n_observations(self) -> int:
        return self.Omega.shape[2]

    def observation_probs(self, belief, action: int) -> np.ndarray:
        """Pr(o | b, a) = sum_s' Omega[s', a, o] sum_s P[s, a, s'] b(s). Returns (Z,)."""
        predicted = np.asarray(belief, dtype=float) @ self.mdp.P[:, action, :]  # (S,) -> (S,)
        return predicted @ self.Omega[:, action, :]  # (S,) @ (S, Z) -> (Z,)

    def belief_update(self, belief, action: int, observation: int) -> np.ndarray:
        """Bayes rule: b'(s') proportional to Omega[s', a, o] sum_s P[s, a, s'] b(s).

        Args:
            belief: (S,) current belief; action, observation: indices.
        Returns:
            (S,) posterior belief.
        Raises:
            ValueError if the observation has probability 0 under (belief, action).
        """
        predicted = np.asarray(belief, dtype=float) @ self.mdp.P[:, action, :]  # (S,)
        joint = predicted * self.Omega[:, action, observation]  # (S,)
        total = joint.sum()
        if total <= 0:
            raise ValueError(f"observation {observation} has probability 0 after action {action}")
        return joint / total

    def describe(self) -> str:
        """The MDP's description plus the observation model, as text."""
        lines = [self.mdp.describe(),
                 "observations: " + ", ".join(f"{o}:{n}" for o, n in
                                              enumerate(self.observation_names))]
        with np.printoptions(precision=3, suppress=True):
            for a, name in enumerate(self.mdp.action_names):
                lines.append(f"Omega[s', a={a} ({name}), o]  rows s', columns o:")
                lines.extend("  " + row for row in str(self.Omega[:, a, :]).splitlines())
            lines.append(f"initial_observation: {self.initial_observation}")
        return "\n".join(lines)


def tiger_pomdp(accuracy: float = 0.85, gamma: float = 0.95, listen_reward: float = -1.0,
                tiger_reward: float = -100.0, treasure_reward: float = 10.0) -> TabularPOMDP:
    """The tiger problem (Kaelbling, Littman & Cassandra 1998).

    A tiger is behind the left (state 0) or right (state 1) door. Actions: 0 = listen
    (reward -1, state unchanged, hear the correct side with probability `accuracy`),
    1 = open left, 2 = open right (-100 if the tiger is there, +10 otherwise; then the
    problem resets: tiger placed uniformly, observation uninformative). Observations:
    0 = hear left, 1 = hear right. No terminal state; gamma < 1.

    Returns:
        TabularPOMDP with S = 2, A = 3, Z = 2.
    """
    P = np.zeros((2, 3, 2))
    P[:, 0, :] = np.eye(2)  # listening leaves the tiger where it is
    P[:, 1:, :] = 0.5  # opening a door resets
    R = np.array([[listen_reward, tiger_reward, treasure_reward],
                  [listen_reward, treasure_reward, tiger_reward]])  # (S, A)
    mdp = TabularMDP(P, R, gamma, initial=[0.5, 0.5],
                     state_names=["tiger-left", "tiger-right"],
                     action_names=["listen", "open-left", "open-right"])
    Omega = np.full((2, 3, 2), 0.5)
    Omega[:, 0, :] = [[accuracy, 1 - accuracy], [1 - accuracy, accuracy]]
    return TabularPOMDP(mdp, Omega, observation_names=["hear-left", "hear-right"])


def controller_value(pomdp: TabularPOMDP, node_policy, next_node, initial_node) -> float:
    """Exact value of a finite-state controller, by a linear solve on (state, node) pairs.

    In node n the agent acts a ~ node_policy[n]; after seeing o it moves to node
    next_node[n, a, o]. The pair (s, n) is then a Markov chain, so

        V(s, n) = sum_a pi(a|n) [ r(s, a) + gamma sum_{s', o} P[s, a, s'] Omega[s', a, o]
                                              V(s', next_node[n, a, o]) ].

    A memoryless policy is the controller whose node is the last observation.

    Args:
        node_policy: (N, A) probabilities.
        next_node: (N, A, Z) int node indices.
        initial_node: (N,) distribution of the first node (independent of the state).
    Returns:
        J = sum_{s, n} initial(s) initial_node(n) V(s, n).
    """
    mdp, Omega = pomdp.mdp, pomdp.Omega
    pi = np.asarray(node_policy, dtype=float)
    nxt = np.asarray(next_node, dtype=int)
    S, N = mdp.n_states, pi.shape[0]
    # M[s, n, s', n'] = Pr(s', n' | s, n); built from (S, A, S) x (S, A, Z) per node
    M = np.zeros((S, N, S, N))
    flow = np.einsum("sat,taz->satz", mdp.P, Omega)  # (S, A, S, Z): Pr(s', o | s, a)
    for n, a, z in itertools.product(range(N), range(mdp.n_actions), range(Omega.shape[2])):
        M[:, n, :, nxt[n, a, z]] += pi[n, a] * flow[:, a, :, z]
    r = mdp.expected_reward @ pi.T  # (S, A) @ (A, N) -> (S, N)
    system = np.eye(S * N) - mdp.gamma * M.reshape(S * N, S * N)
    values = np.linalg.solve(system, r.reshape(S * N)).reshape(S, N)
    return float(mdp.initial @ values @ np.asarray(initial_node, dtype=float))


def memoryless_value(pomdp: TabularPOMDP, obs_policy) -> float:
    """Value of pi(a | o) that sees only the latest observation. obs_policy: (Z, A)."""
    Z, A = pomdp.n_observations, pomdp.mdp.n_actions
    next_node = np.broadcast_to(np.arange(Z), (Z, A, Z))  # node := last observation
    return controller_value(pomdp, obs_policy, next_node, pomdp.initial_observation)


def best_memoryless_policy(pomdp: TabularPOMDP, grid: int = 10) -> tuple[float, np.ndarray]:
    """Search the memoryless policies pi(a | o) on a simplex grid (step 1/grid per row).

    Stochastic memoryless policies can beat deterministic ones (Singh, Jaakkola &
    Jordan 1994), so every grid point is tried, deterministic ones included.

    Returns:
        (best value, best (Z, A) policy).
    """
    A, Z = pomdp.mdp.n_actions, pomdp.n_observations
    rows = [np.array(c) / grid for c in itertools.product(range(grid + 1), repeat=A)
            if sum(c) == grid]  # every (A,) point of the simplex grid
    if len(rows) ** Z > 200_000:
        raise ValueError(f"grid={grid} gives {len(rows) ** Z} policies; use a smaller grid")
    best = (-np.inf, None)
    for choice in itertools.product(rows, repeat=Z):
        policy = np.stack(choice)
        value = memoryless_value(pomdp, policy)
        if value > best[0]:
            best = (value, policy)
    return best


def tiger_belief_controller(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The belief-threshold policy of the tiger problem as a finite-state controller.

    From the uniform belief, listening symmetrically moves the belief so that it is a
    function of d = #hear-left - #hear-right: b(tiger-left) = 1 / (1 + rho**d) with
    rho = (1 - accuracy) / accuracy. "Open the door away from the tiger once
    max(b) >= 1 / (1 + rho**k), else listen" is a controller with nodes d = -k..k
    (node index d + k); after opening, the belief resets to uniform (d = 0).

    Returns:
        (node_policy (2k+1, 3), next_node (2k+1, 3, 2), initial_node (2k+1,)).
    """
    N = 2 * k + 1
    node_policy = np.zeros((N, 3))
    next_node = np.full((N, 3, 2), k)  # opening resets to d = 0 (node k)
    for d in range(-k, k + 1):
        n = d + k
        if d == k:
            node_policy[n, 2] = 1.0  # tiger probably left: open right
        elif d == -k:
            node_policy[n, 1] = 1.0  # tiger probably right: open left
        else:
            node_policy[n, 0] = 1.0
            next_node[n, 0] = [n + 1, n - 1]  # hear-left: d + 1; hear-right: d - 1
    return node_policy, next_node, np.eye(N)[k]


class MemoryDemo(NamedTuple):
    """Output of `memoryless_vs_belief`."""

    memoryless_value: float  # best value of a policy of the current observation only
    memoryless_policy: np.ndarray  # (Z, A) that policy
    belief_value: float  # value of the best belief-threshold policy
    belief_k: int  # its threshold: open after a net k consistent observations
    belief_values: dict  # k -> value, for every threshold tried


def memoryless_vs_belief(pomdp: TabularPOMDP | None = None, max_k: int = 5,
                         grid: int = 10) -> MemoryDemo:
    """Tiger problem: the best memoryless policy versus belief-threshold policies, exactly.

    A memoryless agent cannot tell "I just heard left once" from "I heard left after
    opening a door", so every door it opens is opened on a single observation
    (expected 0.85 * 10 - 0.15 * 100 = -6.5 < -1): its best choice is to listen forever,
    value -1 / (1 - gamma) = -20 for gamma = 0.95. The belief-based agent listens until
    the evidence is strong enough and earns a positive value.

    Args:
        pomdp: a tiger POMDP (default `tiger_pomdp()`).
        max_k: belief thresholds k = 1..max_k are evaluated.
        grid: simplex grid resolution of the memoryless search.
    Returns:
        MemoryDemo.
    """
    pomdp = tiger_pomdp() if pomdp is None else pomdp
    memo_value, memo_policy = best_memoryless_policy(pomdp, grid)
    values = {k: controller_value(pomdp, *tiger_belief_controller(k))
              for k in range(1, max_k + 1)}
    best_k = max(values, key=values.get)
    return MemoryDemo(memo_value, memo_policy, values[best_k], best_k, values)
