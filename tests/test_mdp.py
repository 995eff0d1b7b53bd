"""Tabular MDPs and dynamic programming against closed forms (rlhf_toy.mdp.tabular, .solve)."""

import numpy as np
import pytest

from rlhf_toy.mdp import (
    TabularMDP,
    chain_mdp,
    cliff_walking,
    gridworld,
    iterative_policy_evaluation,
    policy_dynamics,
    policy_evaluation,
    policy_iteration,
    q_from_v,
    value_iteration,
)


def random_mdp(seed=0, S=6, A=3, gamma=0.9):
    """A dense random MDP with (S, A, S) rewards; no terminal states."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S), size=(S, A))  # (S, A, S)
    R = rng.normal(size=(S, A, S))
    return TabularMDP(P, R, gamma)


def random_policy(S, A, seed=1):
    return np.random.default_rng(seed).dirichlet(np.ones(A), size=S)  # (S, A)


def test_chain_values_by_hand_uniform_policy():
    """n = 3 chain (states 0, 1, goal 2), gamma = 0.9, pi = (1/2, 1/2):

        V(1) = 1/2 (1 + gamma * 0) + 1/2 gamma V(0)
        V(0) = 1/2 gamma V(0) + 1/2 gamma V(1)       (left from 0 stays at 0)
    => V(0) = (0.45 / 0.55) V(1) = 9/11 V(1);  V(1) = 0.5 / (1 - 0.45 * 9/11) = 110/139,
       V(0) = 90/139.
    """
    mdp = chain_mdp(3, gamma=0.9)
    values = policy_evaluation(mdp, np.full((3, 2), 0.5))
    np.testing.assert_allclose(values, [90 / 139, 110 / 139, 0.0], rtol=1e-12)


@pytest.mark.parametrize("slip", [0.0, 0.3])
def test_chain_optimal_values_closed_form(slip):
    """"Always right" with slip p: V(s) = (1-p)(1[s = n-2] + gamma V(s+1)) + p gamma V(s), so
    V(s) = c^(n-1-s) gamma^(n-2-s) with c = (1-p)/(1-p gamma); it is optimal, so V* = V.
    """
    n, gamma = 5, 0.9
    mdp = chain_mdp(n, gamma=gamma, slip=slip)
    c = (1 - slip) / (1 - slip * gamma)
    s = np.arange(n - 1)
    expected = np.append(c ** (n - 1 - s) * gamma ** (n - 2 - s), 0.0)
    right = np.tile([0.0, 1.0], (n, 1))
    np.testing.assert_allclose(policy_evaluation(mdp, right), expected, rtol=1e-12)
    solution = value_iteration(mdp)
    np.testing.assert_allclose(solution.values, expected, atol=1e-9)
    np.testing.assert_array_equal(solution.policy[:-1], right[:-1])


def test_chain_q_star_closed_form():
    """slip = 0: Q*(s, right) = V*(s) = gamma^(n-2-s); Q*(s, left) = gamma V*(max(s-1, 0))."""
    n, gamma = 5, 0.9
    mdp = chain_mdp(n, gamma=gamma)
    v = np.append(gamma ** (n - 2 - np.arange(n - 1)), 0.0)
    q = value_iteration(mdp).q
    np.testing.assert_allclose(q[:-1, 1], v[:-1], atol=1e-9)
    np.testing.assert_allclose(q[:-1, 0], gamma * v[np.maximum(np.arange(n - 1) - 1, 0)],
                               atol=1e-9)
    np.testing.assert_array_equal(q[-1], 0.0)


def test_gridworld_example_4_1_random_policy():
    """S & B Example 4.1 / Figure 4.1: 4x4, corners terminal, -1 per step, gamma = 1,
    equiprobable policy. The converged values are exactly these integers; after one sweep
    every non-terminal state is -1, after two a state next to a corner is
    -1 + 1/4 (0 - 1 - 1 - 1) = -1.75 and the others -2.
    """
    mdp = gridworld()
    uniform = np.full((16, 4), 0.25)
    expected = np.array([[0, -14, -20, -22],
                         [-14, -18, -20, -20],
                         [-20, -20, -18, -14],
                         [-22, -20, -14, 0]], dtype=float).ravel()
    np.testing.assert_allclose(policy_evaluation(mdp, uniform), expected, atol=1e-9)
    k1 = iterative_policy_evaluation(mdp, uniform, max_iter=1)
    np.testing.assert_allclose(k1.values, np.where(mdp.terminal, 0.0, -1.0))
    k2 = iterative_policy_evaluation(mdp, uniform, max_iter=2).values.reshape(4, 4)
    np.testing.assert_allclose(k2[0], [0, -1.75, -2, -2])
    full = iterative_policy_evaluation(mdp, uniform, tol=1e-10, max_iter=10_000)
    assert full.delta < 1e-10
    np.testing.assert_allclose(full.values, expected, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_evaluation_linear_solve_equals_iterative(seed):
    """On a random MDP the exact solve satisfies V = r_pi + gamma P_pi V and matches the
    iterative sweeps (a gamma-contraction, so the sweeps converge to the same fixed point)."""
    mdp = random_mdp(seed)
    policy = random_policy(mdp.n_states, mdp.n_actions, seed)
    values = policy_evaluation(mdp, policy)
    P_pi, r_pi = policy_dynamics(mdp, policy)
    np.testing.assert_allclose(values, r_pi + mdp.gamma * P_pi @ values, atol=1e-10)
    iterative = iterative_policy_evaluation(mdp, policy, tol=1e-12)
    np.testing.assert_allclose(iterative.values, values, atol=1e-9)
    # V(s) = sum_a pi(a|s) Q(s, a): Q from V closes the loop
    q = q_from_v(mdp, values)
    np.testing.assert_allclose((policy * q).sum(axis=1), values, atol=1e-10)


@pytest.mark.parametrize("make", [lambda: random_mdp(3), lambda: chain_mdp(6, slip=0.2),
                                  cliff_walking, lambda: gridworld(slip=0.2, gamma=0.95)])
def test_value_iteration_agrees_with_policy_iteration(make):
    mdp = make()
    vi, pi = value_iteration(mdp), policy_iteration(mdp)
    np.testing.assert_allclose(vi.values, pi.values, atol=1e-8)
    np.testing.assert_allclose(vi.q, pi.q, atol=1e-8)
    np.testing.assert_array_equal(vi.policy, pi.policy)
    # Bellman optimality: V* = max_a Q*, and no policy does better than V*
    np.testing.assert_allclose(vi.values, vi.q.max(axis=1), atol=1e-9)
    np.testing.assert_allclose(policy_evaluation(mdp, vi.policy), vi.values, atol=1e-7)


def test_cliff_walking_layout_and_optimum():
    """Start (3, 0) = state 36, goal (3, 11) = 47; stepping right from the start falls off
    the cliff: -100 and back to the start. V*(start) = -13 (up, 11 x right, down)."""
    mdp = cliff_walking()
    assert (mdp.n_states, mdp.n_actions, mdp.gamma) == (48, 4, 1.0)
    assert mdp.initial[36] == 1.0 and np.flatnonzero(mdp.terminal).tolist() == [47]
    assert mdp.P[36, 1, 36] == 1.0 and mdp.R[36, 1, 36] == -100.0  # right = into the cliff
    assert mdp.P[36, 0, 24] == 1.0 and mdp.R[36, 0, 24] == -1.0  # up
    assert mdp.P[35, 2, 47] == 1.0  # down from (2, 11) reaches the goal
    assert value_iteration(mdp).values[36] == pytest.approx(-13.0)


def test_sa_reward_equals_sas_reward():
    mdp = random_mdp(4)
    r_sa = mdp.expected_reward
    other = TabularMDP(mdp.P, r_sa, mdp.gamma)
    np.testing.assert_allclose(other.R[:, :, 0], r_sa)
    np.testing.assert_allclose(value_iteration(other).values, value_iteration(mdp).values)


def test_terminal_states_are_absorbing_with_value_zero():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), size=(3, 2))
    mdp = TabularMDP(P, np.ones((3, 2)), 0.9, terminal=[2], initial=[0.5, 0.5, 0.0])
    np.testing.assert_array_equal(mdp.P[2], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(mdp.R[2], 0.0)
    assert value_iteration(mdp).values[2] == 0.0
    mask = TabularMDP(P, np.ones((3, 2)), 0.9, terminal=np.array([False, False, True]),
                      initial=[0.5, 0.5, 0.0])
    np.testing.assert_array_equal(mask.terminal, mdp.terminal)


def test_improper_policy_with_gamma_one_is_an_error():
    """Always 'left' in cliff walking never reaches the goal: no finite value at gamma = 1."""
    mdp = cliff_walking()
    left = np.tile([0.0, 0.0, 0.0, 1.0], (48, 1))
    with pytest.raises(ValueError, match="never reaches a terminal state"):
        policy_evaluation(mdp, left)


GOOD_P = np.full((2, 1, 2), 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(P=np.full((2, 1, 2), 0.4)), r"P\[0, 0, :\] must sum to 1"),
    (dict(P=np.array([[[1.5, -0.5]], [[0.5, 0.5]]])), "P must be non-negative"),
    (dict(P=np.full((2, 1, 3), 1 / 3)), r"P must have shape \(S, A, S\)"),
    (dict(P=np.full((2, 2), 0.5)), r"P must have shape \(S, A, S\)"),
    (dict(P=np.array([[[np.nan, 1.0]], [[0.5, 0.5]]])), "P must hold finite"),
    (dict(R=np.zeros((3, 1))), r"R must have shape \(S, A, S\)"),
    (dict(R=np.full((2, 1), np.inf)), "R must be finite"),
    (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
    (dict(gamma=-0.1), r"gamma must be in \[0, 1\]"),
    (dict(gamma=1.0), "gamma == 1 is only allowed with terminal states"),
    (dict(initial=[0.7, 0.7]), r"initial\[:\] must sum to 1"),
    (dict(initial=[1.0]), r"initial must have shape \(S,\)"),
    (dict(terminal=[5]), r"terminal must list state indices in \[0, 1\]"),
    (dict(terminal=[0, 1]), "at least one non-terminal state"),
    (dict(terminal=[1], initial=[0.5, 0.5]), "initial must put no probability on terminal"),
    (dict(state_names=["a"]), "state_names must have 2 entries"),
])
def test_validation_errors_name_the_argument(kwargs, match):
    args = dict(P=GOOD_P, R=np.zeros((2, 1)), gamma=0.9) | kwargs
    with pytest.raises(ValueError, match=match):
        TabularMDP(**args)


def test_policy_validation():
    mdp = chain_mdp(3)
    with pytest.raises(ValueError, match=r"policy must have shape \(S, A\)"):
        policy_evaluation(mdp, np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"policy\[1, :\] must sum to 1"):
        policy_evaluation(mdp, [[0.5, 0.5], [0.5, 0.6], [0.5, 0.5]])


def test_builder_validation():
    with pytest.raises(ValueError, match="n must be >= 2"):
        chain_mdp(1)
    with pytest.raises(ValueError, match=r"slip must be in \[0, 1\)"):
        chain_mdp(3, slip=1.0)
    with pytest.raises(ValueError, match="start must be given"):
        gridworld(cliffs=[(1, 1)])
    with pytest.raises(ValueError, match=r"goals must be \(row, col\) cells inside the 4x4 grid"):
        gridworld(goals=[(4, 0)])


def test_gridworld_walls_and_slip():
    """2x2 grid, goal (0, 1), wall (1, 1), start (1, 0): right from the start bumps into the
    wall and stays; up reaches (0, 0). With slip 0.4 into a cliff at (1, 1) instead, 'up'
    from the start executes up w.p. 0.7, right (cliff: -100, back to start) w.p. 0.1,
    down/left (border: stay, -1) w.p. 0.1 each, so r(start, up) = 0.9 * -1 + 0.1 * -100
    = -10.9, and the reward of the start -> start transition is the mean -34."""
    walled = gridworld(rows=2, cols=2, goals=[(0, 1)], walls=[(1, 1)], start=(1, 0))
    assert walled.P[2, 1, 2] == 1.0 and walled.P[2, 0, 0] == 1.0
    assert value_iteration(walled).values[2] == pytest.approx(-2.0)
    slippy = gridworld(rows=2, cols=2, goals=[(0, 1)], cliffs=[(1, 1)], start=(1, 0), slip=0.4)
    np.testing.assert_allclose(slippy.P[2, 0, [0, 2]], [0.7, 0.3])
    assert slippy.expected_reward[2, 0] == pytest.approx(-10.9)
    assert slippy.R[2, 0, 2] == pytest.approx(-34.0)


def test_describe_prints_every_object_of_a_small_mdp():
    mdp = chain_mdp(3)
    text = mdp.describe()
    assert repr(mdp) == "TabularMDP(S=3, A=2, gamma=0.9, terminal=[2])"
    for piece in ["states:  0:s0, 1:s1, 2:goal*", "actions: 0:left, 1:right", "gamma:   0.9",
                  "initial: [1. 0. 0.]", "P[s, a=0 (left), s']", "P[s, a=1 (right), s']",
                  "R[s, a=1 (right), s']", "r(s, a)"]:
        assert piece in text, piece
    assert str(mdp) == text
    # one line per P and R row: 2 arrays x 2 actions x 3 rows
    assert sum(line.startswith("  [") or line.startswith("   [") for line in text.splitlines()) >= 12
    big = cliff_walking().describe()
    assert "P: array (48, 4, 48)" in big and "47:(3,11)*" in big
