"""Algorithm 2: after evolution, keep a small set of templates that together solve every solvable dev item, then
give each hard training sample the templates most likely to help it."""

from __future__ import annotations

import random
from typing import Sequence

from p2o_hpc.gepa.selection import EPS, WEIGHT_FLOOR, Scores, mean_scores


def solved(score: float) -> bool:
    return score >= 1.0 - EPS


def greedy_set_cover(scores: Scores) -> list[int]:
    """Greedy cover of the dev items each candidate solves (score 1).

    Each round picks the candidate solving the most still-uncovered items (ties: higher mean dev score, then lower
    index). Stops when no candidate adds anything; items nobody solves stay uncovered. Greedy is within
    ln(n) + 1 of the optimal cover size, which is plenty for a handful of templates.
    """
    means = mean_scores(scores)
    solves = [{j for j, s in enumerate(row) if solved(s)} for row in scores]
    uncovered = set().union(*solves) if solves else set()
    cover: list[int] = []
    while uncovered:
        best = max(range(len(scores)), key=lambda i: (len(solves[i] & uncovered), means[i], -i))
        gained = solves[best] & uncovered
        if not gained:
            break
        cover.append(best)
        uncovered -= gained
    return cover


def assign_templates(
    hard_ids: Sequence[str],
    dev_ids: Sequence[str],
    scores: Scores,
    cover: Sequence[int],
    k: int,
    rng: random.Random,
) -> dict[str, list[int]]:
    """Draw k candidate indices (with replacement) per hard sample.

    A dev item some candidate solved gets its own solvers (weighted by mean dev score): we know they work on it.
    Any other sample (train split, or unsolved dev item) gets draws from the whole cover set, weighted the same way.
    With an empty cover set nothing is assigned and the sample is rolled out on the plain prompt. Candidate 0 is the
    seed (empty template), so drawing it means "question alone".
    """
    means = mean_scores(scores)
    dev_index = {item_id: j for j, item_id in enumerate(dev_ids)}

    def draw(choices: list[int]) -> list[int]:
        return rng.choices(choices, weights=[max(means[i], WEIGHT_FLOOR) for i in choices], k=k)

    assignments: dict[str, list[int]] = {}
    for hard_id in hard_ids:
        j = dev_index.get(hard_id)
        solvers = [i for i, row in enumerate(scores) if solved(row[j])] if j is not None else []
        if solvers:
            assignments[hard_id] = draw(solvers)
        elif cover:
            assignments[hard_id] = draw(list(cover))
    return assignments
