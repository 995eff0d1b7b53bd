"""The token MDP and its exact KL-regularized optimum against closed forms (rlhf_toy.mdp.token).

Closed form (Rafailov et al. 2023, eq. 4): pi*(y) = pi_ref(y) exp(r(y) / beta) / Z,
J* = beta log Z with Z = sum_y pi_ref(y) exp(r(y) / beta).
"""

import math

import numpy as np
import pytest

from rlhf_toy.mdp.token import (
    TokenMDP,
    enumerable_task_mdp,
    enumerate_responses,
    kl_divergence,
    kl_regularized_optimum,
    kl_regularized_value,
    objective,
    sequence_probs,
    soft_bellman,
    soft_policy,
)

BETAS = [0.05, 0.3, 1.0, 5.0]


def general_mdp():
    """V = 4 with eos_id = 0 (EOS allowed first), a prompt, pi_ref depending on the whole
    state (seeded by it), and a reward that is not a simple count."""

    def ref(state):
        return np.random.default_rng([7, *state]).dirichlet(np.ones(4))  # (V,)

    def reward(response):
        return (sum((i + 1) * t for i, t in enumerate(response)) % 7) / 7

    return TokenMDP(4, 0, 3, ref, reward, prompt=(2, 1))


MDPS = {"task": enumerable_task_mdp, "general": general_mdp}


def closed_form(mdp, beta):
    """pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, computed in log space."""
    ref = enumerate_responses(mdp)
    logits = {y: math.log(p) + mdp.reward(y) / beta for y, p in ref.items()}
    m = max(logits.values())
    log_z = m + math.log(sum(math.exp(v - m) for v in logits.values()))
    return {y: math.exp(v - log_z) for y, v in logits.items()}


def reweighted_policy(mdp, seed):
    """A random policy with the support of pi_ref: pi_ref(a|s) * w(s, a), renormalized."""

    def policy(state):
        ref = mdp.ref_next_probs(state)
        w = ref * np.random.default_rng([seed, *state]).dirichlet(np.ones(mdp.vocab_size))
        return w / w.sum()

    return policy


@pytest.mark.parametrize("name", MDPS)
@pytest.mark.parametrize("beta", BETAS)
def test_optimum_equals_closed_form(name, beta):
    mdp = MDPS[name]()
    opt, expected = kl_regularized_optimum(mdp, beta), closed_form(mdp, beta)
    assert opt.keys() == expected.keys()
    assert max(abs(opt[y] - expected[y]) for y in opt) < 1e-12
    assert abs(sum(opt.values()) - 1.0) < 1e-12


@pytest.mark.parametrize("name", MDPS)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_per_token_policy_is_what_soft_q_implies(name, beta):
    """pi*(a|s) = pi_ref(a|s) exp((Q(s,a) - V(s)) / beta), Q(s,a) = r or V(s + a), and the
    product of per-token probabilities along y is the closed-form pi*(y)."""
    mdp = MDPS[name]()
    sol = soft_bellman(mdp, beta)
    n = len(mdp.prompt)
    for state, q in sol.q.items():
        ref = mdp.ref_next_probs(state)
        implied = ref * np.exp((q - sol.values[state]) / beta)
        np.testing.assert_allclose(sol.policy[state], implied, rtol=0, atol=1e-13)
        assert abs(sol.policy[state].sum() - 1.0) < 1e-13
        for a in np.flatnonzero(ref > 0):
            response = state[n:] + (int(a),)
            target = mdp.reward(response) if mdp.is_done(response) else sol.values[state + (a,)]
            assert q[a] == pytest.approx(target, abs=1e-15)
    expected = closed_form(mdp, beta)
    for y, p in expected.items():
        product = math.prod(sol.policy[mdp.prompt + y[:t]][y[t]] for t in range(len(y)))
        assert abs(product - p) < 1e-12
    policy = soft_policy(mdp, beta)
    assert policy.keys() == sol.policy.keys()
    by_policy = sequence_probs(mdp, policy.__getitem__)
    assert max(abs(by_policy[y] - expected[y]) for y in expected) < 1e-12


@pytest.mark.parametrize("name", MDPS)
@pytest.mark.parametrize("beta", BETAS)
def test_objective_of_optimum_is_j_star_and_v_root(name, beta):
    """objective(pi*) = J* = beta log E_ref[exp(r / beta)] = V(prompt), and pi* beats pi_ref
    and random policies."""
    mdp = MDPS[name]()
    j_star = kl_regularized_value(mdp, beta)
    assert objective(mdp, kl_regularized_optimum(mdp, beta), beta) == pytest.approx(j_star,
                                                                                  abs=1e-12)
    assert soft_bellman(mdp, beta).values[mdp.prompt] == pytest.approx(j_star, abs=1e-12)
    ref = enumerate_responses(mdp)
    # objective(pi_ref) = E_ref[r] (KL = 0) <= beta log E_ref[exp(r / beta)] (Jensen)
    j_ref = objective(mdp, ref, beta)
    assert j_ref == pytest.approx(sum(p * mdp.reward(y) for y, p in ref.items()), abs=1e-12)
    assert j_ref < j_star
    for seed in range(5):
        pi = sequence_probs(mdp, reweighted_policy(mdp, seed))
        assert objective(mdp, pi, beta) < j_star


def test_hand_computed_two_token_example():
    """Tokens x = 0 and EOS = 1, max_len = 2, pi_ref uniform, r = (number of x) / 2, beta = 1.

        responses: (eos) r=0 pi_ref=1/2;  (x, eos) r=1/2 pi_ref=1/4;  (x, x) r=1 pi_ref=1/4 (cut)
        V(x)  = log(1/2 e^{1/2} + 1/2 e^1)            (both children complete)
        V(()) = log(1/2 e^0 + 1/2 e^{V(x)}) = log Z,  Z = 1/2 + 1/4 e^{1/2} + 1/4 e
        pi*(eos | ()) = (1/2) / Z
    """
    mdp = TokenMDP(2, 1, 2, lambda state: np.array([0.5, 0.5]),
                   lambda y: sum(t == 0 for t in y) / 2)
    z = 0.5 + 0.25 * math.exp(0.5) + 0.25 * math.e
    sol = soft_bellman(mdp, 1.0)
    assert sol.values[(0,)] == pytest.approx(math.log(0.5 * math.exp(0.5) + 0.5 * math.e), abs=1e-15)
    assert sol.values[()] == pytest.approx(math.log(z), abs=1e-15)
    assert sol.policy[()][1] == pytest.approx(0.5 / z, abs=1e-15)
    opt = kl_regularized_optimum(mdp, 1.0)
    assert opt == pytest.approx({(1,): 0.5 / z, (0, 1): 0.25 * math.exp(0.5) / z,
                                 (0, 0): 0.25 * math.e / z}, abs=1e-15)


@pytest.mark.parametrize("name", MDPS)
def test_large_beta_gives_reference(name):
    mdp = MDPS[name]()
    ref, opt = enumerate_responses(mdp), kl_regularized_optimum(mdp, 1e6)
    assert kl_divergence(opt, ref) < 1e-12
    assert max(abs(opt[y] - ref[y]) for y in ref) < 1e-6


@pytest.mark.parametrize("name", MDPS)
def test_small_beta_concentrates_on_argmax_reward(name):
    """As beta -> 0, pi* -> pi_ref restricted to argmax_y r(y), renormalized."""
    mdp = MDPS[name]()
    ref, opt = enumerate_responses(mdp), kl_regularized_optimum(mdp, 1e-3)
    best = max(mdp.reward(y) for y in ref)
    argmax = [y for y in ref if mdp.reward(y) == best]
    assert sum(opt[y] for y in argmax) > 1 - 1e-12
    mass = sum(ref[y] for y in argmax)
    assert max(abs(opt[y] - ref[y] / mass) for y in argmax) < 1e-12


def test_max_len_cut_responses_and_no_empty_response():
    """Defaults: first token one of a, b, c (EOS forbidden first), max_len 3:
    3 (x, eos) + 9 (x, y, eos) end with EOS, 27 (x, y, z) are cut without EOS."""
    mdp = enumerable_task_mdp()
    ref = enumerate_responses(mdp)
    eos = mdp.eos_id
    ended = [y for y in ref if y[-1] == eos]
    cut = [y for y in ref if y[-1] != eos]
    assert (len(ref), len(ended), len(cut)) == (39, 12, 27)
    assert all(len(y) == mdp.max_len and eos not in y for y in cut)
    assert (eos,) not in ref and all(mdp.check_response(y) == y for y in ref)
    opt, expected = kl_regularized_optimum(mdp, 0.5), closed_form(mdp, 0.5)
    assert max(abs(opt[y] - expected[y]) for y in cut) < 1e-12
    assert (0,) in enumerate_responses(general_mdp())  # EOS (id 0) allowed first there
    one = TokenMDP(3, 2, 1, lambda s: np.array([0.2, 0.3, 0.5]), lambda y: float(y[0] == 1))
    assert kl_regularized_optimum(one, 1.0) == pytest.approx(
        {(0,): 0.2 / (0.7 + 0.3 * math.e), (1,): 0.3 * math.e / (0.7 + 0.3 * math.e),
         (2,): 0.5 / (0.7 + 0.3 * math.e)}, abs=1e-15)


def test_kl_divergence_by_hand():
    p, q = {(0,): 0.5, (1,): 0.5}, {(0,): 0.25, (1,): 0.75}
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence({(2,): 1.0}, q) == math.inf
    mdp = enumerable_task_mdp()
    assert objective(mdp, {(mdp.eos_id,): 1.0}, 1.0) == -math.inf  # pi_ref(empty) = 0


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta_raises(beta):
    mdp = enumerable_task_mdp()
    for fn in (kl_regularized_optimum, soft_policy, soft_bellman, kl_regularized_value):
        with pytest.raises(ValueError, match="beta"):
            fn(mdp, beta)
    with pytest.raises(ValueError, match="beta"):
        objective(mdp, enumerate_responses(mdp), beta)


def test_invalid_inputs_raise():
    ok_ref, ok_reward = (lambda s: np.array([0.5, 0.5])), (lambda y: 0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenMDP(1, 0, 2, ok_ref, ok_reward)
    with pytest.raises(ValueError, match="eos_id"):
        TokenMDP(2, 2, 2, ok_ref, ok_reward)
    with pytest.raises(ValueError, match="max_len"):
        TokenMDP(2, 1, 0, ok_ref, ok_reward)
    with pytest.raises(ValueError, match="sum to 1"):
        enumerate_responses(TokenMDP(2, 1, 2, lambda s: np.array([0.5, 0.6]), ok_reward))
    with pytest.raises(ValueError, match="shape"):
        enumerate_responses(TokenMDP(2, 1, 2, lambda s: np.ones(3) / 3, ok_reward))
    mdp = TokenMDP(2, 1, 2, ok_ref, ok_reward)
    with pytest.raises(ValueError, match="complete response"):
        objective(mdp, {(0,): 1.0}, 1.0)  # neither EOS-ended nor max_len long
    with pytest.raises(ValueError, match="finite"):
        kl_regularized_value(TokenMDP(2, 1, 2, ok_ref, lambda y: float("nan")), 1.0)


def test_describe_lists_tokens_prefixes_and_responses():
    mdp = enumerable_task_mdp()
    text = mdp.describe(max_rows=100)
    assert "13 non-terminal states, 39 complete responses" in text
    assert "3:<eos>*" in text and "a b <eos>" in text and "a b c" in text
    assert "more rows" in mdp.describe(max_rows=5)
    assert repr(mdp) in str(mdp)
