"""Sampling, returns, action selection, TD control and policy gradients (rlhf_toy.mdp)."""

import numpy as np
import pytest
import torch

import rlhf_toy.core
from rlhf_toy.mdp import (
    boltzmann,
    boltzmann_probs,
    chain_mdp,
    cliff_walking,
    discounted_returns,
    epsilon_greedy,
    epsilon_greedy_probs,
    exact_policy_gradient,
    greedy_rollout,
    gridworld,
    objective,
    policy_evaluation,
    q_learning,
    reinforce_gradient_estimate,
    sample_trajectories,
    sample_trajectory,
    sarsa,
    softmax_policy,
    value_iteration,
)


def test_discounted_returns_is_the_core_function():
    """Same numbers as rlhf_toy.core.discounted_returns on a 4-step episode, gamma = 0.5:
    rewards (1, 2, 3, 4), done after step 1 (index 1):
        G_3 = 4, G_2 = 3 + 0.5 * 4 = 5, G_1 = 2 (done: no bootstrap), G_0 = 1 + 0.5 * 2 = 2.
    """
    rewards, dones = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 0.0, 0.0])
    expected = [2.0, 2.0, 5.0, 4.0]
    np.testing.assert_allclose(discounted_returns(rewards, dones, 0.5), expected)
    core = rlhf_toy.core.discounted_returns(torch.tensor(rewards), torch.tensor(dones), 0.5)
    np.testing.assert_allclose(core.numpy(), expected)
    batch = discounted_returns(np.stack([rewards, rewards]), np.stack([dones, dones]), 0.5)
    assert batch.shape == (2, 4) and isinstance(batch, np.ndarray)


def test_sample_trajectory_is_consistent():
    mdp = gridworld(slip=0.3, gamma=0.9)
    policy = np.full((16, 4), 0.25)
    traj = sample_trajectory(mdp, policy, seed=3)
    T = len(traj.states)
    assert all(x.shape == (T,) for x in traj)
    np.testing.assert_array_equal(traj.next_states[:-1], traj.states[1:])
    np.testing.assert_array_equal(traj.rewards, mdp.R[traj.states, traj.actions, traj.next_states])
    assert traj.dones[-1] == 1.0 and traj.dones[:-1].sum() == 0.0 and traj.mask.all()
    assert mdp.terminal[traj.next_states[-1]] and not mdp.terminal[traj.states].any()
    # the returns of the trajectory: G_0 = sum_t gamma^t r_t
    returns = discounted_returns(traj.rewards, traj.dones, mdp.gamma)
    assert returns[0] == pytest.approx(np.sum(mdp.gamma ** np.arange(T) * traj.rewards))
    # reproducible from the seed
    again = sample_trajectory(mdp, policy, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(traj, again, strict=True))


def test_sampled_returns_match_exact_value():
    """Monte Carlo: mean of G_0 over episodes = sum_s initial(s) V_pi(s) within 4 standard errors."""
    mdp = chain_mdp(4, gamma=0.9, slip=0.2)
    policy = np.tile([0.4, 0.6], (4, 1))
    batch = sample_trajectories(mdp, policy, 4000, seed=0)
    assert batch.states.shape[0] == 4000
    assert np.all(batch.dones.sum(axis=1) == 1.0)  # every episode ended at the goal
    g0 = discounted_returns(batch.rewards, batch.dones, mdp.gamma)[:, 0]  # (B,)
    exact = mdp.initial @ policy_evaluation(mdp, policy)
    assert abs(g0.mean() - exact) < 4 * g0.std(ddof=1) / np.sqrt(len(g0))


def test_truncated_episode_has_no_done():
    mdp = cliff_walking()
    left = np.tile([0.0, 0.0, 0.0, 1.0], (48, 1))  # bumps into the wall forever
    traj = sample_trajectory(mdp, left, seed=0, max_steps=7)
    assert len(traj.states) == 7 and traj.dones.sum() == 0.0
    np.testing.assert_array_equal(traj.rewards, -1.0)


def test_epsilon_greedy_and_boltzmann_probabilities():
    """q = (1, 3, 3, 0), epsilon = 0.2: greedy mass 0.8 split over the tied actions 1, 2:
    pi = (0.05, 0.45, 0.45, 0.05). Boltzmann at tau = 1: exp(q) / sum exp(q)."""
    q = np.array([1.0, 3.0, 3.0, 0.0])
    np.testing.assert_allclose(epsilon_greedy_probs(q, 0.2), [0.05, 0.45, 0.45, 0.05])
    np.testing.assert_allclose(boltzmann_probs(q, 1.0), np.exp(q) / np.exp(q).sum())
    np.testing.assert_allclose(boltzmann_probs(q, 1e-3), [0, 0.5, 0.5, 0], atol=1e-12)
    np.testing.assert_allclose(epsilon_greedy_probs(np.tile(q, (3, 1)), 0.2).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        boltzmann_probs(q, 0.0)
    # sampled frequencies match the probabilities (4 standard errors per action)
    rng, n = np.random.default_rng(0), 20_000
    for pick, probs in ((lambda: epsilon_greedy(q, 0.2, rng), epsilon_greedy_probs(q, 0.2)),
                        (lambda: boltzmann(q, 1.0, rng), boltzmann_probs(q, 1.0))):
        freq = np.bincount([pick() for _ in range(n)], minlength=4) / n
        assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n) + 1e-12)


def test_q_learning_converges_to_q_star():
    """Deterministic 5-state chain, gamma = 0.9: Q*(s, right) = 0.9^(3-s),
    Q*(s, left) = 0.9 V*(max(s-1, 0)). Off-policy: behaving with epsilon = 0.5 still
    learns Q* of the greedy policy; with deterministic transitions a constant alpha
    leaves no noise."""
    mdp = chain_mdp(5, gamma=0.9)
    result = q_learning(mdp, episodes=300, alpha=0.5, epsilon=0.5, seed=0)
    np.testing.assert_allclose(result.q, value_iteration(mdp).q, atol=1e-3)
    again = q_learning(mdp, episodes=300, alpha=0.5, epsilon=0.5, seed=0)
    np.testing.assert_array_equal(result.q, again.q)
    np.testing.assert_array_equal(result.returns, again.returns)


def test_cliff_walking_sarsa_safe_q_learning_optimal():
    """S & B Example 6.6 / Figure 6.4 (epsilon = 0.1, alpha = 0.5): SARSA learns the safe
    path and its online return is about -25; Q-learning learns the optimal edge path but
    its epsilon-greedy behaviour falls off the cliff now and then (about -50). Averaged over
    episodes 100..500 and 3 seeds. The greedy policy of Q-learning walks the edge:
    13 steps, return -13."""
    mdp = cliff_walking()
    sarsa_returns, q_returns = [], []
    for seed in range(3):
        s = sarsa(mdp, episodes=500, alpha=0.5, epsilon=0.1, seed=seed)
        q = q_learning(mdp, episodes=500, alpha=0.5, epsilon=0.1, seed=seed)
        sarsa_returns.append(s.returns[100:].mean())
        q_returns.append(q.returns[100:].mean())
        path = greedy_rollout(mdp, q.q)
        assert len(path.states) == 13 and path.rewards.sum() == -13.0
        # up, 11 x right along row 2, down into the goal
        assert path.actions.tolist() == [0] + [1] * 11 + [2]
    sarsa_mean, q_mean = np.mean(sarsa_returns), np.mean(q_returns)
    assert -35 < sarsa_mean < -17, sarsa_mean
    assert -60 < q_mean < -38, q_mean
    assert sarsa_mean > q_mean + 10


def test_td_validation():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        sarsa(chain_mdp(3), episodes=1, alpha=0.0)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
        q_learning(chain_mdp(3), episodes=1, epsilon=2.0)


def small_grid():
    """2x3 grid, goal (0, 2), start (1, 0), slip 0.1, gamma 0.9: 6 states x 4 actions."""
    return gridworld(rows=2, cols=3, goals=[(0, 2)], start=(1, 0), slip=0.1, gamma=0.9)


def test_exact_policy_gradient_matches_autograd():
    """J(theta) = initial^T (I - gamma P_pi)^-1 r_pi on non-terminal states, differentiated by
    torch autograd through the linear solve, equals the policy-gradient-theorem formula
    d(s) pi(b|s) (Q(s, b) - V(s))."""
    mdp = small_grid()
    theta = np.random.default_rng(0).normal(size=(6, 4))
    t = torch.tensor(theta, requires_grad=True)
    pi = torch.softmax(t, dim=1)  # (S, A)
    P, r = torch.tensor(mdp.P), torch.tensor(mdp.expected_reward)
    live = torch.tensor(~mdp.terminal)
    P_pi = torch.einsum("sa,sat->st", pi, P)[live][:, live]
    r_pi = (pi * r).sum(1)[live]
    values = torch.linalg.solve(torch.eye(int(live.sum())) - mdp.gamma * P_pi, r_pi)
    J = torch.tensor(mdp.initial)[live] @ values
    J.backward()
    assert J.item() == pytest.approx(objective(mdp, theta))
    np.testing.assert_allclose(exact_policy_gradient(mdp, theta), t.grad.numpy(), atol=1e-10)


def test_reinforce_estimate_matches_exact_gradient():
    """REINFORCE's Monte Carlo gradient (eq. 13.8 with the gamma^t factor) is unbiased:
    every component within 4 standard errors of the exact gradient (fixed seed)."""
    mdp = small_grid()
    theta = np.random.default_rng(1).normal(size=(6, 4))
    exact = exact_policy_gradient(mdp, theta)
    est = reinforce_gradient_estimate(mdp, theta, n_episodes=4000, seed=0)
    assert np.all(np.abs(est.grad - exact) <= 4 * est.stderr + 1e-12)
    # not vacuous: many components stand well above the noise (12 of the 20 non-terminal ones)
    assert (np.abs(exact) > 4 * est.stderr).sum() >= 8
    # terminal state: never acted in, zero gradient
    np.testing.assert_array_equal(est.grad[2], 0.0)
    np.testing.assert_array_equal(exact[2], 0.0)


def test_softmax_policy():
    theta = np.array([[0.0, np.log(3.0)], [1000.0, 0.0]])
    np.testing.assert_allclose(softmax_policy(theta), [[0.25, 0.75], [1.0, 0.0]])
