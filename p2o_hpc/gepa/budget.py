"""The GEPA budget, counted in metric calls: one call = one policy rollout scored on one item."""

from __future__ import annotations

import math

# Candidate counts behind DSPy's auto presets (dspy/teleprompt/gepa/gepa.py: AUTO_RUN_SETTINGS); "heavy_4" is the
# P²O authors' 4x-heavy setting.
AUTO_CANDIDATES = {"light": 6, "medium": 12, "heavy": 18, "heavy_4": 72}


def auto_budget(
    num_candidates: int, valset_size: int, minibatch_size: int = 35, full_eval_steps: int = 5, num_preds: int = 1
) -> int:
    """DSPy's GEPA.auto_budget, reproduced exactly (stanfordnlp/dspy, dspy/teleprompt/gepa/gepa.py).

    N = int(max(2 * (2 * num_preds) * log2(num_candidates), 1.5 * num_candidates)) trials, and
    total = V + 5 * num_candidates + N * M + ((N + 1) // m + 1 + [N < m]) * V   (V = valset, M = minibatch, m = steps)
    with total = V + 5 * num_candidates when N == 0.

    Why minibatch_size defaults to 35 and not GEPA's reflection minibatch of 3: DSPy's compile() calls
    auto_budget without a minibatch_size, so every DSPy "auto" run is budgeted with the default M = 35. We keep that
    default to reproduce the budgets the authors actually ran with. We prompt-optimise a single text (the template),
    so num_preds = 1.
    """
    num_trials = int(max(2 * (num_preds * 2) * math.log2(num_candidates), 1.5 * num_candidates))
    if num_trials < 0 or valset_size < 0 or minibatch_size < 0:
        raise ValueError("num_trials, valset_size, and minibatch_size must be >= 0.")
    if full_eval_steps < 1:
        raise ValueError("full_eval_steps must be >= 1.")
    V, N, M, m = valset_size, num_trials, minibatch_size, full_eval_steps
    total = V + num_candidates * 5 + N * M
    if N == 0:
        return total
    periodic_fulls = (N + 1) // m + 1
    extra_final = 1 if N < m else 0
    return total + (periodic_fulls + extra_final) * V


class BudgetExhausted(RuntimeError):
    pass


class MetricBudget:
    """Rollouts spent so far against a fixed total.

    `used` never exceeds `total`: the engine asks `can_afford(n)` before each evaluation and stops when the answer is
    no; `charge` raises BudgetExhausted instead of overspending, so a missing check is loud, not silent.
    """

    def __init__(self, total: int, used: int = 0):
        self.total = int(total)
        self.used = int(used)

    @property
    def remaining(self) -> int:
        return self.total - self.used

    def can_afford(self, n: int) -> bool:
        return self.used + n <= self.total

    def charge(self, n: int) -> None:
        if not self.can_afford(n):
            raise BudgetExhausted(f"charging {n} metric calls would exceed the budget ({self.used}/{self.total})")
        self.used += n

    def state_dict(self) -> dict:
        return {"total": self.total, "used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.used = int(state["total"]), int(state["used"])
