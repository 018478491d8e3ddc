"""Algorithm 2: after evolution, keep a small set of templates that together solve every solvable dev item, then
give each hard training sample the templates most likely to help it.

The rules are the authors' (`_run_gepa_prompt_optimization`, ray_trainer_gepa_wo_additional_grpo_in_distribution.py).
"""

from __future__ import annotations

import random
from typing import Sequence

from p2o_hpc.gepa.selection import EPS, Scores, mean_scores, mean_weight


def solved(score: float) -> bool:
    return score >= 1.0 - EPS


def greedy_set_cover(scores: Scores) -> list[int]:
    """Greedy cover of the dev items each candidate solves (score 1).

    Each round picks the candidate solving the most still-uncovered items; ties go to the lower index (the
    authors' scan keeps the first strictly larger gain). Stops when no candidate adds anything; items nobody
    solves stay uncovered. Greedy is within ln(n) + 1 of the optimal cover size.
    """
    solves = [{j for j, s in enumerate(row) if solved(s)} for row in scores]
    uncovered = set().union(*solves) if solves else set()
    cover: list[int] = []
    while uncovered:
        best = max(range(len(scores)), key=lambda i: (len(solves[i] & uncovered), -i))
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
    """Draw k candidate indices (with replacement) per hard sample, always from the cover set.

    A dev item that cover members solve draws from those members only; any other sample (a train item, or a dev
    item the cover does not solve) draws from the whole cover. Draws are weighted by mean dev score (≤ 0 → 1e-6).
    A template outside the cover is never assigned, even if it solves the item. With an empty cover nothing is
    assigned (the sample is rolled out on the plain prompt; the authors stop with an error there). Candidate 0 is
    the seed (empty template), so drawing it means "question alone". Same-template groups and the one plain
    rollout are applied later (p2o.hooks.rollout_templates).
    """
    means = mean_scores(scores)
    dev_index = {item_id: j for j, item_id in enumerate(dev_ids)}
    cover = list(cover)

    def draw(choices: list[int]) -> list[int]:
        return rng.choices(choices, weights=[mean_weight(means[i]) for i in choices], k=k)

    assignments: dict[str, list[int]] = {}
    if not cover:
        return assignments
    for hard_id in hard_ids:
        j = dev_index.get(hard_id)
        solvers = [i for i in cover if solved(scores[i][j])] if j is not None else []
        assignments[hard_id] = draw(solvers or cover)
    return assignments
