"""Every registered method trained on the enumerable task of `rlhf_toy.bridge`, and the
exact optimum of each method's own population objective.

Shapes: B rollouts, N preference pairs, T response length (<= L = max_len).

On-policy methods (`ppo`, `grpo`, `rloo`, `reinforce_pp`) run their stage's own
`OnPolicyMethod` through `score_rollout` + `update` of `train/onpolicy.py`, with the exact
reward as the score and the KL to pi_ref in the reward with k1 (`grpo --kl_in reward`):
each then ascends J(pi) = E[r] - beta KL(pi || pi_ref), whose maximizer is pi*. (GRPO's
paper setting, `--kl_in loss` with k3, follows the gradient of the reverse KL(pi_ref || pi)
instead, and its group standard deviation reweights prompts; neither has pi* as optimum.)

Preference methods train `train/dpo.py`'s `batch_loss` on pairs y1, y2 ~ pi_ref whose
labels are drawn so that the method's population loss is minimized exactly by pi*:
- dpo: P(y1 > y2) = sigmoid(r1 - r2) (Bradley-Terry on r) at beta: the minimizer has
  beta log pi / pi_ref = r + const, i.e. pi* (Rafailov et al. 2023, sec. 4).
- ipo: the paper's loss on summed log-ratios (Azar et al. 2023, eq. 17) with the linear
  preference P(y1 > y2) = 1/2 + (r1 - r2) / (2 c), c = reward_scale (P in [0, 1]). Its
  minimizer has log pi / pi_ref = (p(y > pi_ref) - 1/2) / tau + const
  = (r - E_ref r) / (2 c tau) + const, so tau = beta / (2 c) makes it pi*.
- simpo: reference-free, gamma = 0, P(y1 > y2) = sigmoid(R*(y1) - R*(y2)) with
  R*(y) = beta_s log pi*(y) / |y| (SimPO's implicit reward of pi*): the minimizer has
  beta_s log pi(y) / |y| = R*(y) + k, and normalization forces k = 0, i.e. pi*.
Two rows whose own optimum is *not* pi*, reported against both:
- ipo_token_mean: `--loss_type ipo` as TRL (log-ratios averaged per token) on ipo's pairs;
  minimizer log pi(y) = log pi_ref(y) + |y| ((r(y) - E_ref r) / beta + k).
- simpo_r_labels: simpo on dpo's pairs (labels from r); minimizer
  log pi(y) = |y| (r(y) + k) / beta_s, no reference at all.
(k: the constant that makes pi sum to 1.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_toy.config import DPOConfig
from rlhf_toy.core import PREFERENCE_LOSSES, ipo_loss
from rlhf_toy.credit import onpolicy_method
from rlhf_toy.mdp.token import enumerate_responses
from rlhf_toy.methods import METHODS, STAGES
from rlhf_toy.models import CriticFreePolicy, PolicyWithValueHead, freeze
from rlhf_toy.rollout import sample
from rlhf_toy.train.common import batch_indices, make_accelerator
from rlhf_toy.train.dpo import (
    PreferenceTensors,
    batch_loss,
    precompute_reference_logps,
    set_learning_rate,
)
from rlhf_toy.train.onpolicy import score_rollout, update

Tokens = tuple[int, ...]

def _unit_scale(cfg) -> dict:
    """PPO, GRPO and REINFORCE++ normalize their advantages to unit scale (whitening, group
    std): smaller steps, and more of them, so that they settle close to pi* rather than
    jitter around it."""
    return {"learning_rate": cfg.ppo_lr / 3, "max_steps": 2 * cfg.ppo_steps}


# each on-policy method's settings beyond (or instead of) the shared ppo_* ones, from the
# BridgeConfig; all prompts are the one BOS
ONPOLICY = {
    # one prompt: the batch's mean is already its prompt's (PPO's default of 4 only splits it)
    "ppo": lambda cfg: {"num_generations": 1, **_unit_scale(cfg)},
    "grpo": lambda cfg: {"num_generations": 8, "kl_in": "reward", **_unit_scale(cfg)},
    "rloo": lambda cfg: {"num_generations": 8},
    "reinforce_pp": _unit_scale,
}


def _trainable(reference):
    policy = copy.deepcopy(reference)
    for param in policy.parameters():
        param.requires_grad_(True)
    return policy.train()


def exact_scores(task, response_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact reward of each sampled response: (B, T), (B, T) -> (B,)."""
    return torch.tensor([task.reward(y) for y in responses(response_ids, mask)])


def responses(response_ids: torch.Tensor, mask: torch.Tensor) -> list[Tokens]:
    """Each sampled response as a tuple of its real token ids."""
    lengths = mask.sum(-1).tolist()
    return [tuple(ids[:n]) for ids, n in zip(response_ids.tolist(), lengths, strict=True)]


def train_onpolicy(name: str, reference, task, cfg, track=None):
    """The stage's own loop steps (score_rollout + update) for `cfg.ppo_steps` iterations,
    the exact reward in place of the reward model; `track(policy)` after each."""
    method = onpolicy_method(METHODS[name].stage)
    config_cls, _ = STAGES[METHODS[name].stage].load()
    shared = {"batch_size": cfg.ppo_batch_size, "mini_batch_size": cfg.ppo_mini_batch_size,
              "ppo_epochs": cfg.ppo_epochs, "learning_rate": cfg.ppo_lr,
              "max_steps": cfg.ppo_steps}
    ocfg = config_cls(output_dir="unused", seed=cfg.seed, device="cpu", beta=cfg.beta,
                      max_new_tokens=task.max_len,
                      missing_eos_penalty=0.0,  # the exact reward already scores cut responses
                      **{**shared, **ONPOLICY[name](cfg)})
    acc = make_accelerator(ocfg)
    with_critic = "critic" in config_cls.__dataclass_fields__
    model = (PolicyWithValueHead if with_critic else CriticFreePolicy)(_trainable(reference))
    optimizer = torch.optim.AdamW(model.parameters(), lr=ocfg.learning_rate,
                                  weight_decay=ocfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    unwrapped = acc.unwrap_model(model)
    tok = task.tokenizer
    prompt_ids = torch.full((ocfg.batch_size, len(task.prompt)), task.prompt[0])  # (B, P)

    def score_fn(prompt_ids, prompt_mask, response_ids, mask) -> torch.Tensor:
        return exact_scores(task, response_ids, mask)  # (B,)

    for it in range(1, ocfg.max_steps + 1):
        it_seed = cfg.seed * 1_000_003 + it * 7919
        unwrapped.eval()
        with torch.no_grad():
            s = sample(unwrapped.policy, prompt_ids, torch.ones_like(prompt_ids),
                       ocfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                       ocfg.temperature, ocfg.top_k,
                       generator=torch.Generator().manual_seed(it_seed))
        batch = score_rollout(method, unwrapped, reference, None, s, ocfg, ocfg.beta, score_fn)
        model.train()
        update(method, model, optimizer, acc, batch, ocfg, ocfg.beta,
               torch.Generator().manual_seed(it_seed))
        if track is not None:
            track(unwrapped.policy)
    return freeze(unwrapped.policy)


def _ipo_summed(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths, beta):
    """IPO as the paper (eq. 17, summed log-ratios), in the registry's signature."""
    return ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


@dataclass(frozen=True)
class PreferenceSetup:
    """A preference row: its label model, its loss (the registry's signature) and beta,
    and its own population optimum (None: pi*)."""

    labels: str  # "bt_r" | "linear_r" | "bt_simpo_star"
    loss: Callable
    beta: Callable  # BridgeConfig -> the loss's beta (IPO's tau)
    extras: tuple = ()
    own_optimum: Callable | None = None  # (mdp, ref, pi_star, cfg) -> dict


def normalized(log_base: dict[Tokens, float], slope: dict[Tokens, float]) -> dict[Tokens, float]:
    """pi(y) = exp(log_base(y) + slope(y) k) with k, found by bisection, making sum pi = 1
    (slope > 0, so the sum rises with k)."""
    ys = list(log_base)
    base, sl = np.array([log_base[y] for y in ys]), np.array([slope[y] for y in ys])
    lo, hi = -1e3, 1e3
    for _ in range(200):
        k = 0.5 * (lo + hi)
        lo, hi = (k, hi) if np.logaddexp.reduce(base + sl * k) < 0 else (lo, k)
    p = np.exp(base + sl * 0.5 * (lo + hi))
    return {y: float(v / p.sum()) for y, v in zip(ys, p, strict=True)}


def ipo_token_mean_optimum(mdp, ref: dict, pi_star: dict, cfg) -> dict:
    mean_r = sum(p * mdp.score(y) for y, p in ref.items())
    return normalized({y: math.log(p) + len(y) * (mdp.score(y) - mean_r) / cfg.beta
                       for y, p in ref.items()}, {y: float(len(y)) for y in ref})


def simpo_r_optimum(mdp, ref: dict, pi_star: dict, cfg) -> dict:
    return normalized({y: len(y) * mdp.score(y) / cfg.simpo_beta for y in ref},
                      {y: len(y) / cfg.simpo_beta for y in ref})


PREFERENCE = {
    "dpo": PreferenceSetup("bt_r", PREFERENCE_LOSSES["sigmoid"], lambda c: c.beta),
    "ipo": PreferenceSetup("linear_r", _ipo_summed, lambda c: c.beta / (2 * c.reward_scale)),
    "simpo": PreferenceSetup("bt_simpo_star", PREFERENCE_LOSSES["simpo"],
                             lambda c: c.simpo_beta, (("simpo_gamma", 0.0),)),
    "ipo_token_mean": PreferenceSetup("linear_r", PREFERENCE_LOSSES["ipo"],
                                      lambda c: c.beta / (2 * c.reward_scale),
                                      own_optimum=ipo_token_mean_optimum),
    "simpo_r_labels": PreferenceSetup("bt_r", PREFERENCE_LOSSES["simpo"],
                                      lambda c: c.simpo_beta, (("simpo_gamma", 0.0),),
                                      simpo_r_optimum),
}


def first_wins_prob(labels: str, y1: list[Tokens], y2: list[Tokens], reward: Callable,
                    pi_star: dict, cfg, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """P(y1 > y2) of each pair under the label model `labels`: (N,)."""
    if labels == "bt_simpo_star":
        star = torch.tensor([[cfg.simpo_beta * math.log(pi_star[y]) / len(y) for y in ys]
                             for ys in (y1, y2)], dtype=dtype)  # (2, N)
        return torch.sigmoid(star[0] - star[1])
    r1, r2 = (torch.tensor([reward(y) for y in ys], dtype=dtype) for ys in (y1, y2))
    if labels == "linear_r":
        return 0.5 + (r1 - r2) / (2 * cfg.reward_scale)
    return torch.sigmoid(r1 - r2)


def population_loss(name: str, mdp, probs: dict, pi_star: dict, cfg) -> float:
    """Row `name`'s loss with infinitely many pairs: its expectation over y1, y2 ~ pi_ref
    and the row's labels, by enumeration (what its own optimum minimizes)."""
    setup, ref = PREFERENCE[name], enumerate_responses(mdp)
    ys = list(ref)
    ref_logp = torch.tensor([math.log(ref[y]) for y in ys], dtype=torch.float64)  # (M,)
    logp = torch.tensor([math.log(probs[y]) for y in ys], dtype=torch.float64)  # (M,)
    lengths = torch.tensor([len(y) for y in ys], dtype=torch.float64)  # (M,)
    c, w = torch.meshgrid(torch.arange(len(ys)), torch.arange(len(ys)), indexing="ij")  # (M, M)
    losses, _, _ = setup.loss(logp[c], logp[w], ref_logp[c], ref_logp[w], lengths[c],
                              lengths[w], beta=setup.beta(cfg), **dict(setup.extras))
    prob = first_wins_prob(setup.labels, [ys[i] for i in c.flatten()],
                           [ys[i] for i in w.flatten()], mdp.score, pi_star, cfg,
                           torch.float64)
    weight = ref_logp[c].exp() * ref_logp[w].exp() * prob.view(c.shape)  # (M, M)
    # each ordered (c, w) stands for the draws (y1, y2) = (c, w) and (w, c)
    return float(2.0 * (weight * losses).sum())


@torch.no_grad()
def preference_pairs(reference, task, cfg, labels: str, pi_star: dict) -> PreferenceTensors:
    """N pairs y1, y2 ~ pi_ref (the same draws for every label model); y1 is chosen with
    probability `first_wins_prob`."""
    n, tok = cfg.dpo_pairs, task.tokenizer
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    prompt_ids = torch.full((2 * n, len(task.prompt)), task.prompt[0])  # (2N, P)
    prompt_mask = torch.ones_like(prompt_ids)
    s = sample(reference, prompt_ids, prompt_mask, task.max_len, tok.eos_token_id,
               tok.pad_token_id, generator=gen)
    ys = responses(s.response_ids, s.mask)
    prob = first_wins_prob(labels, ys[:n], ys[n:], task.reward, pi_star, cfg)  # (N,)
    first_wins = torch.rand(n, generator=gen) < prob  # (N,)
    first = torch.arange(n)
    chosen_rows = torch.where(first_wins, first, first + n)
    rejected_rows = torch.where(first_wins, first + n, first)

    def rows(index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prompt_ids": prompt_ids[index], "prompt_mask": prompt_mask[index],
                "response_ids": s.response_ids[index], "response_mask": s.mask[index]}

    chosen, rejected = rows(chosen_rows), rows(rejected_rows)
    ref_c, ref_r = precompute_reference_logps(reference, chosen, rejected, tok.pad_token_id)
    return PreferenceTensors(chosen, rejected, ref_c, ref_r)


def train_preference(name: str, reference, task, cfg, pi_star: dict, track=None):
    """`run_dpo`'s loop (schedule, batches, clipping) with the row's loss on its pairs."""
    setup = PREFERENCE[name]
    dpo_cfg = DPOConfig(output_dir="unused", seed=cfg.seed, device="cpu",
                        learning_rate=cfg.dpo_lr, batch_size=cfg.dpo_batch_size,
                        max_steps=cfg.dpo_steps)
    data = preference_pairs(reference, task, cfg, setup.labels, pi_star)
    model = _trainable(reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dpo_cfg.learning_rate,
                                  weight_decay=dpo_cfg.weight_decay)
    beta, extras = setup.beta(cfg), dict(setup.extras)

    def loss(*args):
        return setup.loss(*args, beta=beta, **extras)

    for step in range(1, dpo_cfg.max_steps + 1):
        set_learning_rate(optimizer, dpo_cfg, step)
        index = batch_indices(len(data), dpo_cfg.batch_size, step - 1, dpo_cfg.seed)
        value, _ = batch_loss(model, data, index, loss, task.tokenizer.pad_token_id)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), dpo_cfg.max_grad_norm)
        optimizer.step()
        if track is not None:
            track(model)
    return freeze(model)
