"""Parent selection over a score matrix `scores[candidate][dev_item]`.

GEPA keeps every template that is best somewhere instead of only the best on average: a template that solves a
few dev items nobody else solves is a stepping stone, so parents are drawn from the Pareto front.
"""

from __future__ import annotations

import random
from typing import Sequence

EPS = 1e-9
WEIGHT_FLOOR = 1e-6  # keeps an all-zero front sampleable (then uniformly)

Scores = Sequence[Sequence[float]]


def mean_scores(scores: Scores) -> list[float]:
    return [sum(row) / len(row) if len(row) else 0.0 for row in scores]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a >= b on every dev item and > on at least one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(scores: Scores) -> list[int]:
    """Indices of the non-dominated candidates, in index order.

    Identical rows do not dominate each other (no strict > anywhere), so duplicates are all kept; selection then
    simply gives that score profile proportionally more weight.
    """
    return [i for i, row in enumerate(scores) if not any(dominates(other, row) for other in scores)]


def instance_best_counts(scores: Scores) -> list[int]:
    """For each candidate, on how many dev items it reaches the per-item max.

    Ties count for every tied candidate. Items where the max is 0 (nobody solved them) count for nobody: being
    "best" at failing says nothing about a template.
    """
    counts = [0] * len(scores)
    num_items = len(scores[0]) if scores else 0
    for j in range(num_items):
        best = max(row[j] for row in scores)
        if best <= 0:
            continue
        for i, row in enumerate(scores):
            if row[j] >= best - EPS:
                counts[i] += 1
    return counts


def select_parents(scores: Scores, k: int, rng: random.Random, mode: str = "pareto_mean") -> list[int]:
    """Pick the candidates to mutate this iteration.

    "pareto_mean" (paper, Algorithm 4): k i.i.d. draws (always with replacement) from the Pareto front, each
        weighted by its mean dev score (floored, so an all-zero front is sampled uniformly).
    "instance_best_count" (authors' released code): up to k distinct candidates, drawn one after another without
        replacement, weighted by `instance_best_counts`; only candidates with a positive count are eligible. If no
        candidate is best anywhere (all-zero scores), returns the best-mean candidate (lowest index: the seed).
    """
    if not scores:
        raise ValueError("select_parents needs at least one candidate")
    means = mean_scores(scores)
    if mode == "pareto_mean":
        front = pareto_front(scores)
        return rng.choices(front, weights=[max(means[i], WEIGHT_FLOOR) for i in front], k=k)
    if mode == "instance_best_count":
        counts = instance_best_counts(scores)
        pool = [i for i, c in enumerate(counts) if c > 0]
        if not pool:
            return [max(range(len(scores)), key=lambda i: (means[i], -i))]
        chosen: list[int] = []
        while pool and len(chosen) < k:
            pick = rng.choices(pool, weights=[counts[i] for i in pool], k=1)[0]
            chosen.append(pick)
            pool.remove(pick)
        return chosen
    raise ValueError(f"unknown parent selection mode {mode!r} (use 'pareto_mean' or 'instance_best_count')")
