"""GEPA prompt-template evolution for P²O's hard samples (paper Algorithms 2-4), model-free.

The LLM calls (policy rollouts, reflection) are injected into `GEPAEngine`, so all the bookkeeping here (Pareto
selection, budget, checkpoint/resume, set cover, template assignment) is plain Python and unit-testable.
"""

from p2o_hpc.gepa.budget import AUTO_CANDIDATES, BudgetExhausted, MetricBudget, auto_budget
from p2o_hpc.gepa.cover import assign_templates, greedy_set_cover
from p2o_hpc.gepa.evolve import Candidate, Evaluation, GEPAEngine, GEPAResult, GEPASettings, HardItem, split_hard_set
from p2o_hpc.gepa.reflection_prompt import FeedbackRecord, build_reflection_prompt, parse_proposal
from p2o_hpc.gepa.selection import pareto_front, select_parents

__all__ = [
    "AUTO_CANDIDATES", "BudgetExhausted", "Candidate", "Evaluation", "FeedbackRecord", "GEPAEngine", "GEPAResult",
    "GEPASettings", "HardItem", "MetricBudget", "assign_templates", "auto_budget", "build_reflection_prompt",
    "greedy_set_cover", "pareto_front", "parse_proposal", "select_parents", "split_hard_set",
]  # fmt: skip
