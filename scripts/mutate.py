"""Mutation check: plant plausible bugs one at a time and see whether the fast tests catch them.

    python scripts/mutate.py                 # every mutant (about 10 min on 2 busy CPU cores)
    python scripts/mutate.py --only gae      # the mutants whose name contains "gae"
    python scripts/mutate.py --list          # names and the tests each one runs

Each mutant is a source edit (an exact snippet and its replacement) in `rlhf_toy/core/`,
`rlhf_toy/rollout.py` or the update steps (`rlhf_toy/train/`). For each one the project is
copied into a temporary directory (the working tree is never touched), the snippet is
replaced there, and the mutant's tests run with that copy as the working directory, so
`import rlhf_toy` reads the mutated copy. A mutant is *caught* when a test fails. The
snippet must occur exactly once in the files searched; a snippet that is no longer found
(the code moved or changed) is reported as stale and counts as not caught, so the list
cannot silently rot. Exit status 0 only when every mutant is caught.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCHED = ("rlhf_toy/core/*.py", "rlhf_toy/rollout.py", "rlhf_toy/train/*.py")
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache",
                                 ".ruff_cache", "*.egg-info")

CORE = ["tests/test_core_returns.py", "tests/test_core_kl.py", "tests/test_core_losses.py",
        "tests/test_core_properties.py"]
ROLLOUT = ["tests/test_models_rollout.py", "tests/test_rollout_static.py"]
UPDATE = ["tests/test_update_behaviours.py",
          "tests/test_ppo.py::test_first_minibatch_has_ratio_one_and_zero_approx_kl",
          "tests/test_ppo.py::test_rollout_rewards_and_advantages_follow_the_definitions"]
DPO = ["tests/test_dpo.py::test_matches_trl_dpo_trainer",
       "tests/test_dpo.py::test_cached_reference_gives_the_recomputed_loss"]


@dataclass(frozen=True)
class Mutant:
    """A planted bug: replace `old` (exactly one occurrence in `SEARCHED`) by `new`."""

    name: str
    old: str
    new: str
    tests: tuple[str, ...]


def _m(name: str, old: str, new: str, *tests: list[str]) -> Mutant:
    return Mutant(name, old, new, tuple(t for group in tests for t in group))


MUTANTS = [
    # core/returns.py
    _m("masked_mean divides by every element", "return (x * m).sum() / m.sum().clamp(min=1.0)",
       "return (x * m).sum() / m.numel()", CORE),
    _m("masked_var without Bessel's correction", "denom = (n - 1.0) if unbiased else n",
       "denom = n", CORE),
    _m("whiten: shift_mean reversed", "if not shift_mean:", "if shift_mean:", CORE),
    _m("whiten divides by the variance", "(x - mean) * torch.rsqrt(var + eps)",
       "(x - mean) / (var + eps)", CORE),
    _m("last_token_index finds the first real token",
       "first_from_right = flipped.argmax(-1)",
       "first_from_right = t - 1 - mask.bool().long().argmax(-1)", CORE),
    _m("discounted_returns ignore dones", "_zero_padding(gamma * running, ~done[:, t])",
       "gamma * running", CORE),
    _m("gae bootstraps past a done", "_zero_padding(gamma * next_value, keep)",
       "gamma * next_value", CORE),
    _m("gae forgets lam", "_zero_padding(gamma * lam * running, keep)",
       "_zero_padding(gamma * running, keep)", CORE),
    _m("gae returns are the advantages", "returns = _zero_padding(adv + v, real)",
       "returns = _zero_padding(adv, real)", CORE),
    _m("gae reads values of padded steps",
       "next_value = torch.where(real[:, t], v[:, t], next_value)", "next_value = v[:, t]", CORE),
    # core/kl.py
    _m("k1 sign flipped", "return -log_ratio", "return log_ratio", CORE),
    _m("k2 without the 1/2", "return 0.5 * log_ratio.pow(2)", "return log_ratio.pow(2)", CORE),
    _m("k3 with the wrong sign", "torch.expm1(log_ratio) - log_ratio",
       "torch.expm1(log_ratio) + log_ratio", CORE),
    _m("KL penalty becomes a bonus", "torch.where(real, -beta * kl, torch.zeros_like(kl))",
       "torch.where(real, beta * kl, torch.zeros_like(kl))", CORE),
    _m("score on the first token", "last = last_token_index(mask).unsqueeze(-1)",
       "last = torch.zeros_like(last_token_index(mask)).unsqueeze(-1)", CORE),
    _m("adaptive KL error sign", "min(max(current_kl / self.target - 1.0, -0.2), 0.2)",
       "min(max(1.0 - current_kl / self.target, -0.2), 0.2)", CORE),
    _m("adaptive KL error unclipped", "min(max(current_kl / self.target - 1.0, -0.2), 0.2)",
       "current_kl / self.target - 1.0", CORE),
    # core/losses.py
    _m("log-softmax without normalising", "return picked - lse", "return picked", CORE),
    _m("entropy sign", "return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)",
       "return (p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)", CORE),
    _m("PPO takes the min of the two surrogates",
       "return torch.maximum(unclipped, clipped), ratio, clipped > unclipped",
       "return torch.minimum(unclipped, clipped), ratio, clipped > unclipped", CORE),
    _m("PPO ratio inverted",
       "torch.where(real, logprobs - old_logprobs, zero)  # (B, T), 0 on padding",
       "torch.where(real, old_logprobs - logprobs, zero)  # (B, T), 0 on padding", CORE),
    _m("PPO clip range too wide above", "ratio.clamp(1.0 - clip_range, 1.0 + clip_range)",
       "ratio.clamp(1.0 - clip_range, 1.0 + 2 * clip_range)", CORE),
    _m("value loss without the 1/2",
       "loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)",
       "loss = masked_mean(torch.maximum(err, err_clipped), mask)", CORE),
    _m("value clipped around zero, not the old values",
       "v_clipped = old + (v - old).clamp(-clip_range, clip_range)",
       "v_clipped = v.clamp(-clip_range, clip_range)", CORE),
    _m("DPO loss sign", "-(1.0 - label_smoothing) * F.logsigmoid(beta * h)",
       "-(1.0 - label_smoothing) * F.logsigmoid(-beta * h)", CORE),
    _m("DPO loss without beta", "-(1.0 - label_smoothing) * F.logsigmoid(beta * h)",
       "-(1.0 - label_smoothing) * F.logsigmoid(h)", CORE),
    _m("label smoothing term sign", "- label_smoothing * F.logsigmoid(-beta * h))",
       "- label_smoothing * F.logsigmoid(beta * h))", CORE),
    _m("IPO target 1/beta", "(h - 1.0 / (2.0 * beta)).pow(2)", "(h - 1.0 / beta).pow(2)", CORE),
    _m("implicit reward without beta", "beta * chosen_logratios.detach()",
       "chosen_logratios.detach()", CORE, DPO),
    _m("Bradley-Terry reversed", "-F.logsigmoid(chosen_scores - rejected_scores).mean()",
       "-F.logsigmoid(rejected_scores - chosen_scores).mean()", CORE),
    # rollout.py
    _m("sampler ignores the temperature", "logits = logits.float() / temperature",
       "logits = logits.float()", ROLLOUT),
    _m("EOS left out of the mask",
       "steps.append((token, torch.where(alive, logp, 0.0), alive))\n"
       "        alive = alive & (token != eos_token_id)",
       "alive = alive & (token != eos_token_id)\n"
       "        steps.append((token, torch.where(alive, logp, 0.0), alive))", ROLLOUT),
    _m("log-probs of the top-k distribution",
       "logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)",
       "logp = torch.log_softmax(filter_top_k(logits, top_k), dim=-1)"
       ".gather(-1, token[:, None]).squeeze(-1)", ROLLOUT),
    _m("generated tokens repeat the last prompt position", "next_pos = positions[:, -1:] + 1",
       "next_pos = positions[:, -1:]", ROLLOUT),
    # the PPO rollout and update steps (train/)
    _m("update forward drops the temperature",
       "mb.response_ids, mb.mask,\n                                       "
       "temperature=cfg.temperature)", "mb.response_ids, mb.mask)", UPDATE),
    _m("entropy bonus sign", "loss = loss - cfg.ent_coef * entropy",
       "loss = loss + cfg.ent_coef * entropy", UPDATE),
    _m("value loss targets swapped", "ppo_value_loss(values.float(), mb.values, mb.returns,",
       "ppo_value_loss(values.float(), mb.returns, mb.values,", UPDATE),
    _m("reference log-probs without the temperature",
       "ref_logits = response_logits(ref_model, *inputs, temperature=cfg.temperature)",
       "ref_logits = response_logits(ref_model, *inputs)", UPDATE),
    _m("missing-EOS penalty becomes a bonus",
       "scores = scores - cfg.missing_eos_penalty * (~s.ended_with_eos).float()",
       "scores = scores + cfg.missing_eos_penalty * (~s.ended_with_eos).float()", UPDATE),
    _m("values not masked", "values=None if values is None else values.float() * mask",
       "values=None if values is None else values.float()", UPDATE),
    _m("advantage whitening reversed", "if cfg.whiten_advantages:",
       "if not cfg.whiten_advantages:", UPDATE),
    _m("episode ends at the first token",
       "dones = F.one_hot(last_token_index(batch.mask), batch.mask.shape[1]).float()",
       "dones = F.one_hot(torch.zeros_like(last_token_index(batch.mask)), "
       "batch.mask.shape[1]).float()",
       UPDATE),
    # the DPO step (train/dpo.py)
    _m("DPO sums log-probs over padding too",
       'return (logprobs * batch["response_mask"].float()).sum(-1)',
       "return logprobs.sum(-1)", DPO),
    _m("DPO chosen and rejected swapped", "return logps.chunk(2)",
       "return logps.chunk(2)[::-1]", DPO),
    _m("DPO reference log-probs swapped",
       "(data.ref_chosen[index], data.ref_rejected[index])",
       "(data.ref_rejected[index], data.ref_chosen[index])", DPO),
]


def locate(root: str, snippet: str) -> list[str]:
    """The searched files (relative to `root`) containing `snippet`, once per occurrence."""
    hits = []
    for pattern in SEARCHED:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            with open(path) as fh:
                hits += [os.path.relpath(path, root)] * fh.read().count(snippet)
    return hits


def run_tests(workdir: str, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """Run `tests` in `workdir`; (all passed, the last lines of pytest's output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": workdir}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "--hypothesis-seed=0", *tests]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else "")


def check_mutant(mutant: Mutant, timeout: float) -> str:
    """'caught', 'SURVIVED' or 'STALE (...)' for one mutant, in a fresh copy of the project."""
    with tempfile.TemporaryDirectory(prefix="rlhf_toy_mutant_") as tmp:
        work = os.path.join(tmp, "project")
        shutil.copytree(ROOT, work, ignore=IGNORED)
        hits = locate(work, mutant.old)
        if len(hits) != 1:
            return f"STALE (snippet found {len(hits)} times)"
        path = os.path.join(work, hits[0])
        with open(path) as fh:
            text = fh.read()
        with open(path, "w") as fh:
            fh.write(text.replace(mutant.old, mutant.new))
        passed, _ = run_tests(work, mutant.tests, timeout)
        return "SURVIVED" if passed else "caught"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="rlhf_toy_mutant_") as tmp:  # the unmutated code
        work = os.path.join(tmp, "project")
        shutil.copytree(ROOT, work, ignore=IGNORED)
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        passed, last = run_tests(work, tests, args.timeout)
        if not passed:
            print(f"mutate: error: the tests fail without any mutant ({last})", file=sys.stderr)
            return 2
    caught, t0 = 0, time.perf_counter()
    for i, mutant in enumerate(mutants, 1):
        verdict = check_mutant(mutant, args.timeout)
        caught += verdict == "caught"
        print(f"[{i:2d}/{len(mutants)}] {verdict:8s} {mutant.name}", flush=True)
    print(f"mutation score: {caught}/{len(mutants)} caught "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
