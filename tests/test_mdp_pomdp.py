"""Partial observability: the tiger problem, Bayes belief updates, memoryless vs belief."""

import numpy as np
import pytest

from rlhf_toy.mdp import (
    TabularPOMDP,
    controller_value,
    memoryless_value,
    memoryless_vs_belief,
    tiger_belief_controller,
    tiger_pomdp,
)

LISTEN, OPEN_LEFT, OPEN_RIGHT = 0, 1, 2
HEAR_LEFT, HEAR_RIGHT = 0, 1


def test_belief_update_by_bayes_rule():
    """Prior (1/2, 1/2), listen, hear left: posterior proportional to (0.85 * 1/2, 0.15 * 1/2)
    = (0.85, 0.15). Hear left again: (0.85^2, 0.15^2) / (0.7225 + 0.0225) = (0.96980, 0.03020).
    Prior (0.3, 0.7), hear right: (0.3 * 0.15, 0.7 * 0.85) / (0.045 + 0.595) = (0.0703125, 0.9296875).
    Opening a door resets the tiger: (1/2, 1/2) whatever is heard.
    """
    tiger = tiger_pomdp()
    b1 = tiger.belief_update([0.5, 0.5], LISTEN, HEAR_LEFT)
    np.testing.assert_allclose(b1, [0.85, 0.15])
    b2 = tiger.belief_update(b1, LISTEN, HEAR_LEFT)
    np.testing.assert_allclose(b2, [0.7225 / 0.745, 0.0225 / 0.745])
    np.testing.assert_allclose(tiger.belief_update([0.3, 0.7], LISTEN, HEAR_RIGHT),
                               [0.045 / 0.64, 0.595 / 0.64])
    np.testing.assert_allclose(tiger.belief_update(b2, OPEN_LEFT, HEAR_RIGHT), [0.5, 0.5])
    # hearing left then right cancels out
    np.testing.assert_allclose(tiger.belief_update(b1, LISTEN, HEAR_RIGHT), [0.5, 0.5])
    # Pr(o | b, a), the normalizer of Bayes rule: Pr(hear left | (0.3, 0.7), listen) = 0.36
    np.testing.assert_allclose(tiger.observation_probs([0.3, 0.7], LISTEN), [0.36, 0.64])


def test_tiger_controller_nodes_are_beliefs():
    """Node d of the threshold controller holds the belief reached by d net 'hear left's:
    b(tiger-left) = 1 / (1 + rho^d), rho = 0.15 / 0.85, which belief_update reproduces."""
    tiger = tiger_pomdp()
    rho = 0.15 / 0.85
    belief = np.array([0.5, 0.5])
    for d in range(1, 4):
        belief = tiger.belief_update(belief, LISTEN, HEAR_LEFT)
        assert belief[0] == pytest.approx(1 / (1 + rho**d))
    node_policy, next_node, start = tiger_belief_controller(2)
    assert node_policy.shape == (5, 3) and start[2] == 1.0
    np.testing.assert_array_equal(node_policy.argmax(1), [OPEN_LEFT, 0, 0, 0, OPEN_RIGHT])


def test_memoryless_policy_values_closed_form():
    """Always listen: -1 every step, V = -1 / (1 - 0.95) = -20.
    'Open right on hear-left, open left on hear-right' never listens, so every observation
    it sees is uninformative (the first one, and those after an opening): each step is a
    coin flip worth 0.5 * 10 + 0.5 * (-100) = -45, V = -45 / 0.05 = -900."""
    tiger = tiger_pomdp()
    listen = np.tile([1.0, 0.0, 0.0], (2, 1))
    assert memoryless_value(tiger, listen) == pytest.approx(-20.0)
    open_away = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert memoryless_value(tiger, open_away) == pytest.approx(-900.0)


def test_belief_policy_beats_best_memoryless_policy():
    """The observation is not a state: the best memoryless policy (searched over stochastic
    policies too) can only listen forever, -20; the belief policy that opens after a net
    two consistent observations earns about +19.37."""
    demo = memoryless_vs_belief()
    assert demo.memoryless_value == pytest.approx(-20.0)
    np.testing.assert_array_equal(demo.memoryless_policy[:, LISTEN], 1.0)
    assert demo.belief_k == 2
    assert demo.belief_value == pytest.approx(19.3714, abs=1e-3)
    assert demo.belief_value > demo.memoryless_value + 39


def test_belief_policy_value_by_simulation():
    """Simulate the tiger with the agent tracking its belief by belief_update and opening
    once max(b) >= 1 / (1 + rho^2): the mean discounted return (horizon 150, 0.95^150 < 5e-4)
    matches the controller's exact value within 4 standard errors."""
    tiger = tiger_pomdp()
    rng = np.random.default_rng(0)
    threshold = 1 / (1 + (0.15 / 0.85) ** 2) - 1e-9
    returns = []
    for _ in range(300):
        state, belief, total = rng.integers(2), np.array([0.5, 0.5]), 0.0
        for t in range(150):
            if belief.max() >= threshold:
                action = OPEN_RIGHT if belief[0] > belief[1] else OPEN_LEFT
            else:
                action = LISTEN
            total += 0.95**t * tiger.mdp.R[state, action, 0]
            state, _ = tiger.mdp.step(state, action, rng)
            obs = rng.choice(2, p=tiger.Omega[state, action])
            belief = tiger.belief_update(belief, action, obs)
        returns.append(total)
    exact = controller_value(tiger, *tiger_belief_controller(2))
    assert abs(np.mean(returns) - exact) < 4 * np.std(returns, ddof=1) / np.sqrt(len(returns))


def test_pomdp_validation_and_describe():
    tiger = tiger_pomdp()
    with pytest.raises(ValueError, match=r"Omega must have shape \(S, A, Z\)"):
        TabularPOMDP(tiger.mdp, np.full((2, 2, 2), 0.5))
    with pytest.raises(ValueError, match=r"Omega\[0, 0, :\] must sum to 1"):
        TabularPOMDP(tiger.mdp, np.full((2, 3, 2), 0.4))
    with pytest.raises(ValueError, match="probability 0"):
        TabularPOMDP(tiger.mdp, np.tile([1.0, 0.0], (2, 3, 1))).belief_update(
            [0.5, 0.5], LISTEN, HEAR_RIGHT)
    text = tiger.describe()
    for piece in ["tiger-left", "open-right", "hear-left", "Omega[s', a=0 (listen), o]"]:
        assert piece in text
