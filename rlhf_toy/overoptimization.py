"""Reward-model over-optimization seen without the gold reward.

PPO maximizes the score of one learned reward model (the proxy). Two gold-free signals, over
the held-out evaluations (proxy_i, kl_i, audit_i), i = 0 the policy before training:

1. `audit`: the reward stage also trains an audit reward model on pairs the proxy never
   saw. With p the evaluation of the highest audit score so far, fire at evaluation k > p if

       audit_p - audit_k > max(drop * (audit_p - audit_0), min_drop)   and   proxy_k >= proxy_p

   (the audit score lost more than `drop` of its gain, and at least `min_drop` Bradley-Terry
   logits: a mean gap of 0.5 means the audit model prefers the earlier responses about 62 %
   of the time; smaller dips are the noise of 128 prompts) while the proxy did not fall.
   It needs the audit model to see the errors the policy exploits; an audit model trained on
   the same kind of samples can share the proxy's blind spots.
2. `kl_slope`: the proxy bought per nat of KL. With s_1 = (proxy_1 - proxy_0) / kl_1 the
   rate of the first evaluation, evaluation j is a jump if its KL grew by at least half
   since evaluation j-1 (and by at least `min_kl` nats) while the proxy grew by less than
   `slope_frac * s_1` per nat; fire at evaluation k = j+1 if the policy stayed out there
   (kl_k >= kl_j - min_kl): it moved far from the reference, where the reward model was
   never trained, for almost no proxy (the regime where Gao et al. 2023 see the gold reward
   fall). A jump the KL controller pulls back at the next evaluation does not fire.
3. `kl_budget`: the KL stayed above `kl_budget` nats at two evaluations in a row (the
   stages set it to 3 x the task's target KL). The proxy keeps rising with the KL however
   far the policy goes, so the proxy-versus-KL curve alone cannot tell where the gold
   reward turns; the KL can: on both built-in tasks, seeds 0-4 at beta 0, every run whose
   gold fell below the SFT policy's crossed 3 x target (README, "Defaults that hold on
   every task"), and no run at the defaults came near it.

It fires once, on the first rule met; `summary()` records which, where and the numbers.
"""

from __future__ import annotations


class OveroptimizationMonitor:
    """Watches (step, proxy, kl, audit) evaluations; `update` returns True when it fires.

    Args:
        drop: fraction of the audit score's gain over the start that must be lost (> 0).
        min_drop: the smallest fall of the audit score that counts (>= 0).
        slope_frac: fraction of the first proxy-per-nat rate below which a KL step fires (> 0).
        min_kl: the smallest KL growth (nats) between two evaluations the slope rule reads (> 0).
        kl_budget: the KL (nats) the budget rule reads (> 0); None: no budget rule.
    """

    def __init__(self, drop: float = 0.5, min_drop: float = 0.5, slope_frac: float = 0.1,
                 min_kl: float = 1.0, kl_budget: float | None = None):
        if not (drop > 0 and min_drop >= 0 and slope_frac > 0 and min_kl > 0
                and (kl_budget is None or kl_budget > 0)):
            raise ValueError("drop, slope_frac, min_kl and kl_budget must be > 0 and min_drop "
                             f">= 0 (got {drop}, {slope_frac}, {min_kl}, {kl_budget}, "
                             f"{min_drop})")
        self.params = {"drop": float(drop), "min_drop": float(min_drop),
                       "slope_frac": float(slope_frac), "min_kl": float(min_kl),
                       "kl_budget": None if kl_budget is None else float(kl_budget)}
        self.evals: list[dict[str, float]] = []
        self.fired: dict | None = None

    def update(self, step: int, proxy: float, kl: float, audit: float | None = None) -> bool:
        """Record one evaluation; True if the indicator fires at this one (only once)."""
        self.evals.append({"step": step, "proxy": proxy, "kl": kl, "audit": audit})
        if self.fired is None and len(self.evals) >= 3:  # 0, the first rate, then compare
            self.fired = self._audit_rule() or self._slope_rule() or self._budget_rule()
            return self.fired is not None
        return False

    def _audit_rule(self) -> dict | None:
        *past, now = self.evals
        if now["audit"] is None:
            return None
        peak = max(past, key=lambda e: e["audit"])
        gain = peak["audit"] - past[0]["audit"]
        lost = peak["audit"] - now["audit"]
        if lost > max(self.params["drop"] * gain, self.params["min_drop"]) and \
                now["proxy"] >= peak["proxy"]:
            return {"rule": "audit", **now, "ref_step": peak["step"], "ref_proxy": peak["proxy"],
                    "ref_audit": peak["audit"]}
        return None

    def _slope_rule(self) -> dict | None:
        if len(self.evals) < 4:
            return None
        start, first = self.evals[0], self.evals[1]
        prev, jump, now = self.evals[-3:]
        first_rate = (first["proxy"] - start["proxy"]) / max(first["kl"] - start["kl"], 1e-6)
        dkl = jump["kl"] - prev["kl"]
        rate = (jump["proxy"] - prev["proxy"]) / max(dkl, 1e-6)
        min_kl = self.params["min_kl"]
        if dkl >= max(min_kl, 0.5 * prev["kl"]) and rate < self.params["slope_frac"] * first_rate \
                and now["kl"] >= jump["kl"] - min_kl:
            return {"rule": "kl_slope", **now, "ref_step": prev["step"], "ref_kl": prev["kl"],
                    "jump_kl": jump["kl"], "rate": rate, "first_rate": first_rate}
        return None

    def _budget_rule(self) -> dict | None:
        budget = self.params.get("kl_budget")  # absent in states saved before the rule
        prev, now = self.evals[-2:]
        if budget is not None and prev["kl"] > budget and now["kl"] > budget:
            return {"rule": "kl_budget", **now, "ref_step": prev["step"], "ref_kl": prev["kl"],
                    "budget": budget}
        return None

    def message(self) -> str:
        """The one warning line of a fired indicator."""
        f = self.fired
        if f["rule"] == "audit":
            why = (f"the proxy score rose to {f['proxy']:.3f} (from {f['ref_proxy']:.3f} at "
                   f"iteration {f['ref_step']}) while the audit reward model's score fell from "
                   f"{f['ref_audit']:.3f} to {f['audit']:.3f}")
        elif f["rule"] == "kl_budget":
            why = (f"the KL to the reference stayed above its budget of {f['budget']:.1f} nats "
                   f"({f['ref_kl']:.2f} at iteration {f['ref_step']}, {f['kl']:.2f} now) while "
                   f"the proxy rose to {f['proxy']:.3f}")
        else:
            why = (f"the KL to the reference jumped from {f['ref_kl']:.2f} to {f['jump_kl']:.2f} "
                   f"nats after iteration {f['ref_step']} for {f['rate']:.3f} proxy per nat (the "
                   f"first iterations bought {f['first_rate']:.3f}) and stayed ({f['kl']:.2f})")
        return (f"reward-model over-optimization at iteration {f['step']}: {why}; an earlier "
                f"policy (or a smaller target_kl / larger beta) is likely better")

    def summary(self) -> dict:
        """`fired`, the rule's numbers and `message` where it fired (`rule`, `step`, ...),
        every evaluation."""
        fired = {**self.fired, "message": self.message()} if self.fired else {}
        return {"fired": self.fired is not None, **fired, "params": self.params,
                "evals": self.evals}

    def state_dict(self) -> dict:
        return {"params": self.params, "evals": list(self.evals), "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.params, self.evals, self.fired = state["params"], list(state["evals"]), state["fired"]
