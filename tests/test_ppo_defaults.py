"""PPO's defaults: score centering against the untrained critic's length bias, the
over-optimization indicator, and (slow, on the full-size default pipeline of seed 0)
continuation from a converged policy, the indicator on beta 0 and robustness to a 1e-4
perturbation of the reward model."""

import json
import os
import shutil

import pytest
import torch

from rlhf_toy.config import RewardConfig, parse_config
from rlhf_toy.integrity import write_manifest
from rlhf_toy.models import AUDIT_DIR, PolicyWithValueHead, build_policy, freeze, load_reward_model
from rlhf_toy.overoptimization import OveroptimizationMonitor
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer
from rlhf_toy.train.onpolicy import collect_rollout, learning_rate
from rlhf_toy.train.ppo import PPO, PPOConfig


def constant_score_rollout(center: bool, whiten_advantages: bool, c: float = 2.5):
    """A rollout of a fresh policy whose every response scores `c`, with beta 0."""
    torch.manual_seed(0)
    tok = build_tokenizer(get_task("sentiment").words)
    model = PolicyWithValueHead(build_policy(tok)).eval()
    cfg = PPOConfig(output_dir="unused", beta=0.0, lam=0.9, max_new_tokens=8,
                    missing_eos_penalty=0.0, center_scores=center,
                    whiten_advantages=whiten_advantages)

    def score_fn(prompt_ids, prompt_mask, response_ids, mask):
        return torch.full((response_ids.shape[0],), c)

    prompts = ["the movie was", "the plot", "the", "the cast seemed"] * 4
    batch = collect_rollout(PPO, model, freeze(build_policy(tok)), None, tok, prompts, cfg, 0.0,
                            torch.Generator().manual_seed(0), score_fn=score_fn)
    return batch, cfg


def test_uncentered_shared_score_becomes_a_bias_towards_eos():
    """With a zero value head, gamma 1 and beta 0, GAE gives A_t = lam^(L-1-t) * c: a score
    every response shares still favours late tokens (EOS) over early ones; whitening then
    makes the first tokens' advantages negative on average. Centering removes it: A = 0 everywhere."""
    batch, cfg = constant_score_rollout(center=False, whiten_advantages=False)
    lengths = batch.mask.sum(-1)  # (B,)
    t = torch.arange(batch.mask.shape[1]).float()  # (T,)
    expected = cfg.lam ** (lengths[:, None] - 1 - t) * 2.5 * batch.mask  # (B, T)
    assert torch.allclose(batch.advantages, expected, atol=1e-5)
    assert (lengths > 1).sum() >= 4

    whitened, _ = constant_score_rollout(center=False, whiten_advantages=True)
    long = lengths > 1
    last = (lengths - 1).long()
    rows = torch.arange(len(lengths))
    assert (whitened.advantages[rows, last][long] > whitened.advantages[long, 0]).all()
    assert whitened.advantages[long, 0].mean() < 0 < whitened.advantages[rows, last].mean()

    centered, _ = constant_score_rollout(center=True, whiten_advantages=True)
    assert centered.advantages.abs().max() < 1e-6


def test_target_kl_is_the_flag_else_the_tasks_else_the_default():
    """--target_kl wins; else the task's own (sentiment 3, sorting 2); else
    DEFAULT_TARGET_KL (a task that proposes none, or a user's prompts: task None)."""
    from rlhf_toy.config import DEFAULT_TARGET_KL
    from rlhf_toy.tasks.base import Task
    from rlhf_toy.train.onpolicy import target_kl

    class Plain(Task):  # proposes nothing
        sample_prompt = sample_response = gold = None

    cfg = PPOConfig(output_dir="unused")
    assert [target_kl(cfg, t) for t in (get_task("sentiment"), get_task("sorting"), Plain(),
                                        None)] == [3.0, 2.0, DEFAULT_TARGET_KL, DEFAULT_TARGET_KL]
    assert target_kl(PPOConfig(output_dir="unused", target_kl=1.5), get_task("sorting")) == 1.5


def test_learning_rate_schedule_closed_form():
    """Iteration it of max_steps 10 at 1e-3: constant; linear 1e-3 * (1 - (it - 1) / 10);
    with 4 warm-up iterations also times min(1, it / 5); and a bad name is one usage error."""
    from rlhf_toy.config import UsageError

    const = PPOConfig(output_dir="unused", learning_rate=1e-3, max_steps=10,
                      lr_scheduler_type="constant")
    linear = PPOConfig(output_dir="unused", learning_rate=1e-3, max_steps=10,
                       lr_scheduler_type="linear")
    warm = PPOConfig(output_dir="unused", learning_rate=1e-3, max_steps=10,
                     lr_scheduler_type="linear", warmup_steps=4)
    assert [learning_rate(const, it) for it in (1, 10)] == [1e-3, 1e-3]
    assert [learning_rate(linear, it) for it in (1, 6, 10)] == \
        pytest.approx([1e-3, 0.5e-3, 0.1e-3])
    assert [learning_rate(warm, it) for it in (1, 2, 6)] == \
        pytest.approx([1e-3 * 1 / 5, 1e-3 * 2 / 5 * 0.9, 0.5e-3])
    with pytest.raises(UsageError, match="lr_scheduler_type"):
        PPOConfig(output_dir="unused", lr_scheduler_type="cosine")


def test_overoptimization_audit_rule_fires_when_proxy_rises_and_audit_falls():
    """Evaluations (step, proxy, kl, audit): audit peaks at 1.0 (step 10, gain 1.0 over the
    start). At step 20 it lost 0.4 < max(0.5 * 1.0, 0.5): quiet. At step 30 it lost
    0.6 > 0.5 while the proxy (2.5) is above its value at the peak (1.0): fires, once."""
    m = OveroptimizationMonitor(drop=0.5, min_drop=0.5)
    fired = [m.update(s, p, 1.0, a) for s, p, a in
             [(0, 0.0, 0.0), (10, 1.0, 1.0), (20, 2.0, 0.6), (30, 2.5, 0.4), (40, 3.0, 0.0)]]
    assert fired == [False, False, False, True, False]
    s = m.summary()
    assert s["fired"] and s["rule"] == "audit" and s["step"] == 30 and s["ref_step"] == 10
    assert (s["proxy"], s["audit"], s["ref_proxy"], s["ref_audit"]) == (2.5, 0.4, 1.0, 1.0)
    assert "iteration 30" in m.message()


def test_overoptimization_audit_rule_quiet_when_both_fall_or_the_dip_is_small():
    both_fall = OveroptimizationMonitor(drop=0.5)
    for s, p, a in [(0, 0.0, 0.0), (10, 2.0, 1.0), (20, 1.0, 0.0), (30, 1.5, 0.0)]:
        both_fall.update(s, p, 1.0, a)  # the proxy fell below 2.0 as well: a bad step
    small_dip = OveroptimizationMonitor(drop=0.5, min_drop=0.5)
    for s, p, a in [(0, 0.0, 1.0), (10, 1.0, 1.1), (20, 2.0, 0.7)]:
        small_dip.update(s, p, 1.0, a)  # lost 0.4 > 0.5 * 0.1 of a small gain, but < min_drop
    assert not both_fall.summary()["fired"] and not small_dip.summary()["fired"]
    restored = OveroptimizationMonitor()
    restored.load_state_dict(both_fall.state_dict())
    assert restored.summary() == both_fall.summary()


def test_overoptimization_kl_slope_rule():
    """(step, proxy, kl): the first rate is (1.0 - 0.0) / 1.0 = 1 proxy per nat. Step 20 ->
    30: KL 2 -> 10 (+8 >= max(1, 0.5 * 2)) for +0.4 proxy, 0.05 per nat < 0.1 * 1: a jump. At
    step 40 the KL stays at 9.5 >= 10 - 1: fires there. The same jump pulled back to KL 3
    at step 40 stays quiet."""
    stays, back = OveroptimizationMonitor(slope_frac=0.1, min_kl=1.0), OveroptimizationMonitor()
    for m, last_kl in ((stays, 9.5), (back, 3.0)):
        for s, p, kl in [(0, 0.0, 0.0), (10, 1.0, 1.0), (20, 2.0, 2.0), (30, 2.4, 10.0),
                         (40, 2.5, last_kl)]:
            m.update(s, p, kl)
    s = stays.summary()
    assert s["fired"] and s["rule"] == "kl_slope" and s["step"] == 40 and s["ref_step"] == 20
    assert s["rate"] == pytest.approx(0.05) and s["first_rate"] == pytest.approx(1.0)
    assert "jumped from 2.00 to 10.00" in stays.message()
    assert not back.summary()["fired"]


def test_overoptimization_kl_budget_rule():
    """Budget 6 nats, (step, proxy, kl) with the proxy rising all along: KL 7 at step 20 is one
    evaluation above (quiet), 5 at step 30 back under (quiet), 7 and 8 at steps 40 and 50
    two in a row: fires at 50. Without a budget the same run is quiet (the slope rule sees
    no jump of half the KL)."""
    run = [(0, 0.0, 0.0), (10, 1.0, 4.0), (20, 1.5, 7.0), (30, 1.6, 5.0), (40, 2.0, 7.0),
           (50, 2.2, 8.0), (60, 2.3, 9.0)]
    m, plain = OveroptimizationMonitor(kl_budget=6.0), OveroptimizationMonitor()
    assert [m.update(s, p, k, None) for s, p, k in run] == [False] * 5 + [True, False]
    for s, p, k in run:
        plain.update(s, p, k, None)
    s = m.summary()
    assert s["rule"] == "kl_budget" and (s["step"], s["ref_step"], s["kl"], s["ref_kl"]) == \
        (50, 40, 8.0, 7.0)
    assert "stayed above its budget of 6.0 nats" in m.message()
    assert not plain.summary()["fired"]
    with pytest.raises(ValueError, match="kl_budget"):
        OveroptimizationMonitor(kl_budget=0.0)


def test_kl_budget_is_three_targets():
    """3 x the controller's target (the flag, else the task's); 3 x the task's target for a
    stage at a fixed beta (the critic-free defaults), whatever their unused target_kl."""
    from rlhf_toy.train.onpolicy import kl_budget
    from rlhf_toy.train.rloo import RLOOConfig

    assert kl_budget(PPOConfig(output_dir="unused"), get_task("sorting")) == 6.0
    assert kl_budget(PPOConfig(output_dir="unused", target_kl=1.0), get_task("sorting")) == 3.0
    assert kl_budget(RLOOConfig(output_dir="unused"), get_task("sentiment")) == 9.0


def test_the_defaults_are_ppo_and_dpo_sigmoid_only():
    """PPO and DPO's sigmoid loss take the measured defaults; the critic-free methods and
    the other preference losses keep theirs (measured by their own sweeps)."""
    from rlhf_toy.config import LOSS_TYPE_DEFAULTS
    from rlhf_toy.train.grpo import GRPOConfig
    from rlhf_toy.train.reinforce_pp import ReinforcePPConfig
    from rlhf_toy.train.rloo import RLOOConfig

    fields = ("learning_rate", "beta", "adaptive_kl", "target_kl", "kl_horizon",
              "center_scores", "eval_steps", "warmup_steps", "lr_scheduler_type")
    c = PPOConfig()
    assert tuple(getattr(c, f) for f in fields) == (3e-4, 0.3, True, None, 160, True, 10, 0,
                                                    "linear")
    assert c.num_generations == 4
    for cls, lr, beta in ((GRPOConfig, 1e-3, 0.2), (RLOOConfig, 1e-3, 0.05),
                          (ReinforcePPConfig, 5e-4, 0.05)):
        c = cls()
        assert tuple(getattr(c, f) for f in fields) == (lr, beta, False, 2.0, 10000, False,
                                                        0, 0, "constant")
    assert [LOSS_TYPE_DEFAULTS[k]["learning_rate"] for k in ("sigmoid", "ipo", "simpo")] == \
        [3e-4, 1e-3, 1e-4]
    from rlhf_toy.config import DPOConfig  # DPO's budget: 600 x 64; IPO and SimPO keep theirs
    assert [(c.max_steps, c.batch_size) for c in (DPOConfig(), DPOConfig(loss_type="ipo"),
                                                  DPOConfig(loss_type="simpo"))] == \
        [(600, 64), (300, 32), (300, 32)]
    assert (DPOConfig(max_steps=10).max_steps, DPOConfig(batch_size=8).batch_size) == (10, 8)


# ----------------------------------------------------------------- slow: full-size seed 0


def run(stage_cls, runner, task: str = "sentiment", **kw) -> dict:
    argv = [f"--{k}={v}" for k, v in kw.items()] + ["--device", "cpu", "--seed", "0",
                                                    "--task", task]
    return runner(parse_config(stage_cls, argv))


def pipeline(out: str, task: str) -> str:
    """sft -> prefs -> reward (with its audit model) at the pipeline's defaults, seed 0,
    and PPO at its defaults, on `task`, into OUT."""
    from rlhf_toy.cli import _stages

    stages = _stages()
    for stage, inputs in (("sft", {}), ("prefs", {"sft_dir": "sft"}),
                          ("reward", {"sft_dir": "sft", "prefs_dir": "prefs"}),
                          ("ppo", {"sft_dir": "sft", "reward_dir": "reward"})):
        cls, runner, _ = stages[stage]
        run(cls, runner, task, output_dir=os.path.join(out, stage),
            **{k: os.path.join(out, v) for k, v in inputs.items()})
    return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default task's seed-0 pipeline (the README's)."""
    return pipeline(str(tmp_path_factory.mktemp("default_run")), "sentiment")


def ppo(out: str, name: str, sft_dir: str = "sft", reward_dir: str = "reward",
        task: str = "sentiment", **kw) -> dict:
    from rlhf_toy.train.ppo import run_ppo

    return run(PPOConfig, run_ppo, task, output_dir=os.path.join(out, name),
               sft_dir=os.path.join(out, sft_dir), reward_dir=os.path.join(out, reward_dir), **kw)


def summary(out: str, stage: str) -> dict:
    with open(os.path.join(out, stage, "summary.json")) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_continuing_from_a_converged_policy_keeps_it(default_run):
    """PPO from the finished PPO policy (its own reference, a fresh value head) for 5
    iterations loses at most 0.05 held-out gold."""
    first = summary(default_run, "ppo")
    assert first["gold_reward_after"] > first["gold_reward_before"] + 0.25
    cont = ppo(default_run, "ppo_cont", sft_dir="ppo", max_steps=5)
    assert cont["gold_reward_before"] == pytest.approx(first["gold_reward_after"])
    assert cont["gold_reward_after"] >= cont["gold_reward_before"] - 0.05


@pytest.mark.slow
def test_indicator_fires_on_beta_0_and_stays_quiet_at_the_defaults(tmp_path):
    """beta 0 on sorting (seed 0; in the 5-seed sweep every sorting seed's beta 0 run ended
    below its SFT policy, README): the proxy rises by more than 1 while held-out gold ends
    below where it started, and the indicator fires; the default run is quiet and gains."""
    out = pipeline(str(tmp_path), "sorting")
    zero = ppo(out, "ppo_beta0", task="sorting", beta=0.0)
    assert zero["proxy_reward_after"] > zero["proxy_reward_before"] + 1.0
    assert zero["gold_reward_after"] < zero["gold_reward_before"]  # over-optimized
    assert zero["overoptimization"]["fired"]
    default = summary(out, "ppo")
    assert default["gold_reward_after"] > default["gold_reward_before"] + 0.05
    assert not default["overoptimization"]["fired"]


@pytest.mark.slow
def test_ppo_gold_moves_little_when_the_reward_model_moves_by_1e_4(default_run):
    """Float rounding differs between machines; a relative 1e-4 perturbation of every
    reward-model weight stands in for it. PPO's final gold moves by less than 0.05."""
    src, dst = os.path.join(default_run, "reward"), os.path.join(default_run, "reward_perturbed")
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, AUDIT_DIR))
    model = load_reward_model(src)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-4 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    write_manifest(dst)  # the copy's manifest lists the old weights and the audit model
    moved = ppo(default_run, "ppo_perturbed", reward_dir="reward_perturbed")
    base = summary(default_run, "ppo")
    assert abs(moved["gold_reward_after"] - base["gold_reward_after"]) < 0.05


def test_reward_config_checks_audit_steps():
    from rlhf_toy.config import UsageError

    with pytest.raises(UsageError, match="audit_steps must be >= 0"):
        RewardConfig(audit_steps=-1)
