"""Bridge to the real trainers: every method on an enumerable task, against the exact optimum.

Shapes: B batch, P prompt length (1: BOS), T response length, V the GPT's vocabulary
(specials included), N preference pairs, L = max_len.

The RLHF objective (Rafailov et al. 2023, eq. 3) J(pi) = E_pi[r] - beta KL(pi || pi_ref) has
the maximizer pi*(y) = pi_ref(y) exp(r(y) / beta) / Z and the value J* = beta log Z (eq. 4).
On a task small enough to enumerate (`rlhf_toy.mdp.token`), both are exact, and so is
J(pi) of any GPT policy: its distribution over every complete response is a product of
next-token probabilities read off one forward pass. Since

    J* - J(pi) = beta KL(pi || pi*)     (exactly, for every pi),

the objective gap and the KL to the optimum are the same number up to beta.

Steps of `run_bridge`:
1. task: `enumerable_task_mdp` (words a, b, c, ..., a seeded bigram pi_ref); the reward is
   `reward_scale` times the fraction of the response's tokens equal to the target word.
2. reference ("SFT"): a tiny GPT-2 fitted by cross-entropy to the task's exact next-token
   distributions at every prefix (no sampling). The specials other than EOS are masked
   out of its logits, so its support is exactly the task's responses.
3. exact MDP: the fitted GPT is pi_ref of every trainer *and* of the exact `TokenMDP`
   (its float64 next-token probabilities at every prefix), so J* is measured against
   the very reference the trainers regularize to and the fitting error drops out.
4. on-policy methods (ppo, grpo, rloo, reinforce_pp): each stage's own `OnPolicyMethod`
   through `score_rollout` + `update` of `train/onpolicy.py`, with the exact reward as the
   score function in place of a reward model (`bridge_methods.train_onpolicy`).
5. preference methods (dpo, ipo, simpo): pairs y1, y2 ~ pi_ref, trained with
   `train/dpo.py`'s `batch_loss`, each on labels drawn so that its population loss is
   minimized exactly by pi* (`bridge_methods`: DPO on Bradley-Terry labels
   sigmoid(r1 - r2), IPO on linear ones, SimPO on its own implicit reward of pi*); what is
   left is finite-data and optimization error. Two more rows train a method whose own
   optimum is not pi* and report the distance to both.
6. exact evaluation of each policy: J(pi), J* - J(pi), KL(pi || pi*), KL to its own
   optimum, E[r], KL(pi || pi_ref).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from rlhf_toy.bridge_methods import ONPOLICY, PREFERENCE, train_onpolicy, train_preference
from rlhf_toy.core import dpo_loss
from rlhf_toy.mdp.token import (
    TokenMDP,
    enumerable_task_mdp,
    enumerate_responses,
    kl_divergence,
    kl_regularized_optimum,
    kl_regularized_value,
    objective,
    sequence_probs,
    target_fraction,
)
from rlhf_toy.models import build_policy, freeze
from rlhf_toy.tokenizer import build_tokenizer

Tokens = tuple[int, ...]


@dataclass
class BridgeConfig:
    """Every knob of the bridge run; the defaults take about 30 s of CPU time (one thread)."""

    seed: int = 0  # seeds the task's reference table, every model and every draw
    n_tokens: int = 3  # words a, b, c, ... (plus EOS)
    max_len: int = 3  # response length limit in tokens, EOS included
    target: int = 0  # the rewarded word (0 = "a")
    concentration: float = 1.0  # Dirichlet concentration of the task's bigram rows
    reward_scale: float = 2.0  # r(y) = reward_scale * fraction of target tokens
    beta: float = 0.5  # KL coefficient of J, of PPO's penalty and of DPO
    n_layer: int = 2  # tiny GPT-2
    n_embd: int = 32
    n_head: int = 2
    sft_steps: int = 300  # exact cross-entropy fit of the reference
    sft_lr: float = 1e-2
    ppo_steps: int = 30  # on-policy iterations (PPO, GRPO, REINFORCE++: twice as many, at lr / 3)
    ppo_batch_size: int = 64  # rollouts per iteration
    ppo_mini_batch_size: int = 32
    ppo_epochs: int = 4
    ppo_lr: float = 3e-3
    dpo_pairs: int = 8000  # preference pairs drawn from pi_ref
    dpo_steps: int = 300  # preference optimizer steps (linear decay to 0, as TRL)
    dpo_batch_size: int = 64
    dpo_lr: float = 3e-3
    simpo_beta: float = 2.0  # SimPO's scale of the length-normalized log-prob
    # what to train: on-policy (ppo, grpo, rloo, reinforce_pp) with ppo_* settings, then
    # preference rows (`bridge_methods.PREFERENCE`) with dpo_* settings
    methods: str = "ppo grpo rloo reinforce_pp dpo ipo simpo ipo_token_mean simpo_r_labels"
    num_threads: int = 1  # torch CPU threads during the run (restored after): tiny models
    # run fastest on one, and many threads on a busy machine can be 40x slower


@dataclass
class BridgeTask:
    """The task in the GPT's token ids: the exact MDP is built from it and a GPT policy."""

    tokenizer: object
    prompt: Tokens  # (BOS,)
    words: Tokens  # ids of the task's words, in task order
    eos_id: int
    max_len: int
    task_mdp: TokenMDP  # the task in its own ids: words 0..n-1, EOS n; its pi_ref is the SFT target
    reward_scale: float
    target_id: int

    def reward(self, response: Tokens) -> float:
        """r(y) = reward_scale * fraction of y's non-EOS tokens equal to the target word."""
        return self.reward_scale * target_fraction(response, self.target_id, self.eos_id)

    def to_task_ids(self, state: Tokens) -> Tokens:
        """GPT state (prompt + words) -> the task's response prefix."""
        index = {t: i for i, t in enumerate(self.words)}
        return tuple(index[t] for t in state[len(self.prompt):])


def make_task(cfg: BridgeConfig) -> BridgeTask:
    """Step 1: the enumerable task, and a tokenizer whose words are its tokens."""
    task_mdp = enumerable_task_mdp(cfg.n_tokens, cfg.max_len, cfg.target, cfg.seed,
                                   cfg.concentration)
    tokenizer = build_tokenizer(task_mdp.token_names[:-1])
    words = tuple(tokenizer.convert_tokens_to_ids(task_mdp.token_names[:-1]))
    return BridgeTask(tokenizer, (tokenizer.bos_token_id,), words, tokenizer.eos_token_id,
                      cfg.max_len, task_mdp, cfg.reward_scale, words[cfg.target])


def restrict_vocab(model: GPT2LMHeadModel, allowed: list[int]) -> GPT2LMHeadModel:
    """Push every logit outside `allowed` down by 1e4 (a forward hook on the LM head, kept
    by `copy.deepcopy`): their probability underflows to exactly 0 even in float64, so
    sampling, log-probs and losses all see the task's support. Finite, not -inf, so that
    padding's log-prob times a 0 mask stays 0 instead of NaN."""
    bias = torch.full((model.config.vocab_size,), -1e4)
    bias[allowed] = 0.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out))
    return model


def _prefix_batch(task: BridgeTask) -> tuple[torch.Tensor, list[Tokens]]:
    """Every word sequence of length L - 1 after the prompt: its positions cover every
    non-terminal state. Returns (input_ids (N, P + L - 1), the sequences)."""
    longest = list(itertools.product(task.words, repeat=task.max_len - 1))
    return torch.tensor([task.prompt + s for s in longest]).reshape(len(longest), -1), longest


@torch.no_grad()
def next_token_table(model: GPT2LMHeadModel, task: BridgeTask) -> dict[Tokens, np.ndarray]:
    """pi(. | state) of a GPT at every non-terminal state, in float64, from one forward pass.

    Returns:
        dict state (prompt + word prefix shorter than L) -> (V,) probabilities; a policy for
        `sequence_probs`.
    """
    ids, longest = _prefix_batch(task)
    p = len(task.prompt)
    logits = model(input_ids=ids, use_cache=False).logits  # (N, P + L - 1, V)
    logits = logits[:, p - 1:]  # (N, L, V): row t predicts the token after prefix t
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    return {task.prompt + seq[:t]: probs[n, t] for n, seq in enumerate(longest)
            for t in range(task.max_len)}


def response_probs(model: GPT2LMHeadModel, task: BridgeTask, mdp: TokenMDP) -> dict[Tokens, float]:
    """The GPT's exact distribution over every complete response (prefix-tree enumeration)."""
    return sequence_probs(mdp, next_token_table(model, task).__getitem__)


def exact_mdp(model: GPT2LMHeadModel, task: BridgeTask) -> TokenMDP:
    """Step 3: the task's TokenMDP with the GPT's next-token probabilities as pi_ref."""
    names = task.tokenizer.convert_ids_to_tokens(list(range(len(task.tokenizer))))
    return TokenMDP(len(task.tokenizer), task.eos_id, task.max_len,
                    next_token_table(model, task).__getitem__, task.reward,
                    prompt=task.prompt, token_names=names)


def fit_reference(task: BridgeTask, cfg: BridgeConfig) -> GPT2LMHeadModel:
    """Step 2: a tiny GPT-2 fitted to the task's pi_ref by exact cross-entropy.

    The loss is sum over prefixes s of H(pi_task(. | s), pi_gpt(. | s)), each distinct prefix
    counted once (a prefix of length t sits in n^(L - 1 - t) rows of the batch).
    """
    torch.manual_seed(cfg.seed)
    model = restrict_vocab(build_policy(task.tokenizer, cfg.n_layer, cfg.n_embd, cfg.n_head,
                                        n_positions=task.max_len + 1),
                           [*task.words, task.eos_id])
    ids, longest = _prefix_batch(task)
    target = np.zeros((len(longest), task.max_len, len(task.tokenizer)))  # (N, L, V)
    for n, seq in enumerate(longest):
        for t in range(task.max_len):
            state = task.prompt + seq[:t]
            target[n, t, [*task.words, task.eos_id]] = task.task_mdp.ref_next_probs(
                task.to_task_ids(state))
    target = torch.tensor(target, dtype=torch.float32)
    weight = float(cfg.n_tokens) ** -torch.arange(task.max_len - 1, -1, -1.0)  # (L,)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    p = len(task.prompt)
    for _ in range(cfg.sft_steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, p - 1:]  # (N, L, V)
        logp = torch.log_softmax(logits, -1).masked_fill(target == 0, 0.0)  # 0 * -inf -> 0
        loss = -((target * logp).sum(-1) * weight).sum() / weight.sum() / len(longest)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return freeze(model)


def population_dpo_loss(mdp: TokenMDP, probs: dict, beta: float) -> float:
    """The DPO loss with infinitely many pairs: its expectation over y1, y2 ~ pi_ref with
    the exact Bradley-Terry label P(y1 > y2) = sigmoid(r(y1) - r(y2)), by enumeration.

    Its minimizer is pi* (Rafailov et al. 2023, section 4): the implicit reward
    beta log pi / pi_ref then equals r up to a constant, matching every label. log 2 at pi_ref.
    """
    ref = enumerate_responses(mdp)
    ys = list(ref)
    ref_logp = torch.tensor([math.log(ref[y]) for y in ys], dtype=torch.float64)  # (M,)
    logp = torch.tensor([math.log(probs[y]) for y in ys], dtype=torch.float64)  # (M,)
    r = torch.tensor([mdp.score(y) for y in ys], dtype=torch.float64)  # (M,)
    c, w = torch.meshgrid(torch.arange(len(ys)), torch.arange(len(ys)), indexing="ij")  # (M, M)
    losses, _, _ = dpo_loss(logp[c], logp[w], ref_logp[c], ref_logp[w], beta)  # y_c beats y_w
    weight = ref_logp[c].exp() * ref_logp[w].exp() * torch.sigmoid(r[c] - r[w])  # (M, M)
    # a draw (y1, y2) is labelled either way round, so each ordered (c, w) stands for two
    # draws: E = sum_{y1, y2} ref ref [s12 l(y1, y2) + s21 l(y2, y1)] = 2 sum_{c, w} weight l
    return float(2.0 * (weight * losses).sum())


def exact_metrics(mdp: TokenMDP, probs: dict, beta: float, pi_star: dict,
                  j_star: float) -> dict[str, float]:
    """Step 6: a policy's exact J, gap, KLs, expected reward and population DPO loss."""
    j = objective(mdp, probs, beta)
    return {"J": j, "gap": j_star - j, "kl_to_optimum": kl_divergence(probs, pi_star),
            "kl_from_optimum": kl_divergence(pi_star, probs),
            "expected_reward": float(sum(p * mdp.score(y) for y, p in probs.items())),
            "kl_to_ref": kl_divergence(probs, enumerate_responses(mdp)),
            "dpo_population_loss": population_dpo_loss(mdp, probs, beta),
            "total_prob": float(sum(probs.values()))}


def run_bridge(cfg: BridgeConfig | None = None) -> dict:
    """Steps 1-6; returns the exact numbers of the reference, every method and the optima.

    Returns:
        dict with `config`, `j_star`, `n_responses`, `policies` (name -> `exact_metrics`),
        `curves` (name -> exact gap after each step) and `wall_s` (name -> seconds).
    """
    cfg = cfg or BridgeConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BridgeConfig) -> dict:
    wall, t0 = {}, time.perf_counter()
    task = make_task(cfg)
    reference = fit_reference(task, cfg)
    mdp = exact_mdp(reference, task)
    pi_star, j_star = kl_regularized_optimum(mdp, cfg.beta), kl_regularized_value(mdp, cfg.beta)
    ref_probs = enumerate_responses(mdp)
    wall["reference"] = time.perf_counter() - t0

    def gap(model) -> float:
        return j_star - objective(mdp, response_probs(model, task, mdp), cfg.beta)

    curves, trained, own = {}, {"reference": reference}, {}
    for name in cfg.methods.split():
        t0, curves[name] = time.perf_counter(), []
        track = curves[name].append
        if name in ONPOLICY:
            trained[name] = train_onpolicy(name, reference, task, cfg,
                                           track=lambda model, t=track: t(gap(model)))
        else:
            trained[name] = train_preference(name, reference, task, cfg, pi_star,
                                             track=lambda model, t=track: t(gap(model)))
            if PREFERENCE[name].own_optimum is not None:
                own[name] = PREFERENCE[name].own_optimum(mdp, ref_probs, pi_star, cfg)
        wall[name] = time.perf_counter() - t0
    policies = {}
    for name, model in trained.items():
        probs = response_probs(model, task, mdp)
        policies[name] = exact_metrics(mdp, probs, cfg.beta, pi_star, j_star)
        policies[name]["kl_to_own_optimum"] = kl_divergence(probs, own.get(name, pi_star))
    policies["optimum"] = exact_metrics(mdp, pi_star, cfg.beta, pi_star, j_star)
    policies["optimum"]["kl_to_own_optimum"] = 0.0
    for name, probs in own.items():
        policies[f"{name} optimum"] = exact_metrics(mdp, probs, cfg.beta, pi_star, j_star)
        policies[f"{name} optimum"]["kl_to_own_optimum"] = 0.0
    return {"config": asdict(cfg), "j_star": j_star, "n_responses": len(pi_star),
            "policies": policies, "curves": curves, "wall_s": wall}


COLUMNS = (("J", "J(pi)"), ("gap", "J* - J(pi)"), ("kl_to_optimum", "KL(pi||pi*)"),
           ("kl_to_own_optimum", "KL(pi||own opt)"), ("expected_reward", "E[r]"),
           ("kl_to_ref", "KL(pi||pi_ref)"))


def format_table(result: dict) -> str:
    """The policies of a `run_bridge` result as a fixed-width text table."""
    lines = [f"{'method':<24}" + "".join(f"{title:>16}" for _, title in COLUMNS)]
    for name, row in result["policies"].items():
        # round(., 4) + 0.0 prints a rounding-level -1e-17 as 0.0000, not -0.0000
        lines.append(f"{name:<24}" + "".join(f"{round(row[key], 4) + 0.0:>16.4f}"
                                             for key, _ in COLUMNS))
    lines.append(f"J* = {result['j_star']:.4f}  (beta = {result['config']['beta']}, "
                 f"{result['n_responses']} responses; J* - J(pi) = beta KL(pi||pi*))")
    return "\n".join(lines)
