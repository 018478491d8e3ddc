"""Parent selection over a score matrix `scores[candidate][dev_item]`.

GEPA keeps every template that is best somewhere instead of only the best on average: a template that solves a
few dev items nobody else solves is a stepping stone, so parents are drawn from the Pareto front.
"""

from __future__ import annotations

import random
from typing import Sequence

EPS = 1e-9
WEIGHT_FLOOR = 1e-6  # the authors' weight for a template whose mean dev score is ≤ 0 (all-zero: uniform draws)

Scores = Sequence[Sequence[float]]


def mean_scores(scores: Scores) -> list[float]:
    return [sum(row) / len(row) if len(row) else 0.0 for row in scores]


def mean_weight(mean: float) -> float:
    """Sampling weight of a template: its mean dev score, WEIGHT_FLOOR when that is ≤ 0 (the authors'
    `_weights_for_indices`, ray_trainer_gepa_wo_additional_grpo_in_distribution.py)."""
    return mean if mean > 0.0 else WEIGHT_FLOOR


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a >= b on every dev item and > on at least one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(scores: Scores) -> list[int]:
    """Indices of the non-dominated candidates, in index order.

    Identical rows do not dominate each other (no strict > anywhere), so duplicates are all kept.
    """
    return [i for i, row in enumerate(scores) if not any(dominates(other, row) for other in scores)]


def instance_best_sets(scores: Scores) -> list[set[int]]:
    """For each dev item, the candidates reaching that item's maximum score (ties: all of them).

    An item everybody fails (max 0) holds every candidate: the authors' `program_at_pareto_front_valset` starts
    each item at {seed} and adds a new candidate on `new_score == old_score`, zeros included.
    """
    num_items = len(scores[0]) if scores else 0
    best_sets = []
    for j in range(num_items):
        best = max(row[j] for row in scores)
        best_sets.append({i for i, row in enumerate(scores) if row[j] >= best - EPS})
    return best_sets


def instance_best_counts(scores: Scores) -> list[int]:
    """For each candidate, on how many dev items it is in the per-item best set (see instance_best_sets)."""
    counts = [0] * len(scores)
    for best in instance_best_sets(scores):
        for i in best:
            counts[i] += 1
    return counts


def _distinct_weighted(pool: list[int], weights: dict[int, float], k: int, rng: random.Random) -> list[int]:
    """All of `pool` (ascending) when it has ≤ k members, else k distinct draws one after another, each weighted
    among the members not drawn yet (the authors' loop over `_select_pareto_candidate_idx(excluded=...)`)."""
    if len(pool) <= k:
        return sorted(pool)
    left, chosen = list(pool), []
    for _ in range(k):
        pick = rng.choices(left, weights=[weights[i] for i in left], k=1)[0]
        chosen.append(pick)
        left.remove(pick)
    return chosen


def select_parents(scores: Scores, k: int, rng: random.Random, mode: str = "pareto_mean") -> list[int]:
    """This iteration's parents (distinct; each gets one reflective mutation).

    "pareto_mean" (paper, Algorithm 4): the Pareto front (non-dominated candidates); all of it when it has ≤ k
        members, else k distinct members drawn weighted by mean dev score (≤ 0 → 1e-6).
    "instance_best_count" (the authors' code, `_run_gepa_prompt_optimization`): the union of the per-dev-item
        best sets; all of it when it has ≤ k members, else k distinct members drawn weighted by the number of
        items whose best set holds them.
    Draws without replacement are sequential weighted draws, so an rng state gives one answer.
    """
    if not scores:
        raise ValueError("select_parents needs at least one candidate")
    if mode == "pareto_mean":
        means = mean_scores(scores)
        front = pareto_front(scores)
        return _distinct_weighted(front, {i: mean_weight(means[i]) for i in front}, k, rng)
    if mode == "instance_best_count":
        counts = instance_best_counts(scores)
        pool = [i for i, c in enumerate(counts) if c > 0]
        if not pool:  # no dev items: nothing is best anywhere (the authors then take every candidate)
            pool = list(range(len(scores)))
        return _distinct_weighted(pool, {i: float(max(counts[i], 1)) for i in pool}, k, rng)
    raise ValueError(f"unknown parent selection mode {mode!r} (use 'pareto_mean' or 'instance_best_count')")
