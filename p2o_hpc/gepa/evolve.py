"""Algorithm 3: evolve prompt templates for the hard samples with GEPA-style reflective mutation.

The engine is pure bookkeeping around two injected callables, so it runs in tests without a model:
    evaluate(template, items) -> [Evaluation]   policy rollouts, one metric call per item
    propose(prompt_text) -> str                 the reflection LLM; may raise
The mutation slot is an operator (parent template, feedback records, rng) -> child template | None: GEPA's
reflective mutation around `propose` (the paper's), or another one in its place (`reflection=edit`:
p2o_hpc.gepa.edit_mutation); acceptance, budget, Pareto pool, dedupe and counters are the same for every operator.

Resumability: the whole state (pool, budget, counters, RNG state, position inside the iteration) is written
atomically after every parent step. Work done after the last checkpoint is simply redone on restart from the saved
RNG state, and the budget is restored from the same checkpoint, so a crash + restart records exactly what an
uninterrupted run records (given a deterministic evaluator/proposer) and no call is counted twice.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from p2o_hpc.config import GEPAConfig
from p2o_hpc.gepa.budget import AUTO_CANDIDATES, MetricBudget, auto_budget
from p2o_hpc.gepa.cover import assign_templates, greedy_set_cover, solved
from p2o_hpc.gepa.reflection_prompt import FeedbackRecord, build_reflection_prompt, parse_proposal
from p2o_hpc.gepa.selection import mean_scores, select_parents
from p2o_hpc.io_utils import atomic_write_text

STATE_VERSION = 2  # 2: the authors' disjoint dev/train split
COUNTER_NAMES = (
    "iterations", "parent_steps", "skipped_perfect", "proposed", "failed", "invalid", "duplicate",
    "rejected", "accepted", "dropped_for_budget",
)  # fmt: skip


@dataclass(frozen=True)
class HardItem:
    id: str
    question: str
    ground_truth: str


@dataclass(frozen=True)
class Evaluation:
    score: float
    response: str
    format_ok: bool = True  # the response keeps the reward's answer format (picks the reflection feedback)


Evaluate = Callable[[str, list[HardItem]], list[Evaluation]]
Propose = Callable[[str], str]
# (parent template, its minibatch feedback, the engine's RNG) -> child template, or None when it has none to offer
# (counted `invalid`); raises MutationFailed when its model failed (counted `failed`). The RNG is the engine's
# checkpointed one: an operator that draws only from it proposes the same children after a resume.
Mutation = Callable[[str, list[FeedbackRecord], random.Random], str | None]


class MutationFailed(RuntimeError):
    """The operator's model failed (a flaky reflection LLM); the step is skipped and the cause kept."""


class ReflectiveMutation:
    """GEPA's reflective mutation (the paper's operator): the reflection prompt built from the parent's minibatch
    feedback, one `propose` call, the new template parsed from the answer. It draws nothing from the RNG."""

    def __init__(self, propose: Propose, *, tokenizer=None, feedback_token_budget: int | None = None):
        self.propose, self.tokenizer, self.feedback_token_budget = propose, tokenizer, feedback_token_budget

    def __call__(self, parent: str, records: list[FeedbackRecord], rng: random.Random) -> str | None:
        prompt = build_reflection_prompt(parent, records, tokenizer=self.tokenizer,
                                         token_budget=self.feedback_token_budget)
        try:
            answer = self.propose(prompt)
        except Exception as exc:  # a flaky reflection LLM must not kill a long run
            raise MutationFailed(f"{type(exc).__name__}: {exc}") from exc
        return parse_proposal(answer)


@dataclass(frozen=True)
class GEPASettings:
    """gepa.* as configured, plus what the run derives for this engine."""

    gepa: GEPAConfig
    templates_per_sample: int  # K templates assigned to each hard sample (the learner's algorithm.n_samples)
    # Tokens the reflection prompt may take (reflection context − reflection max_tokens); the minibatch's
    # responses are fitted into it with the engine's tokenizer. None: responses are shown whole.
    feedback_token_budget: int | None = None


@dataclass
class Candidate:
    template: str
    parent: int | None
    dev_scores: list[float]


@dataclass
class GEPAResult:
    pool: list[Candidate]
    dev_ids: list[str]
    cover: list[int]
    assignments: dict[str, list[int]]  # hard id -> candidate indices
    budget_used: int
    budget_total: int
    counters: dict[str, int]
    skipped: bool = False

    def to_json(self) -> dict:
        return {
            "pool": [
                {
                    "index": i,
                    "template": c.template,
                    "parent": c.parent,
                    "dev_mean": mean_scores([c.dev_scores])[0],
                    "dev_scores": list(c.dev_scores),
                }
                for i, c in enumerate(self.pool)
            ],
            "dev_ids": list(self.dev_ids),
            "cover": list(self.cover),
            "assignments": {hid: [self.pool[i].template for i in idx] for hid, idx in self.assignments.items()},
            "budget": {"used": self.budget_used, "total": self.budget_total},
            "counters": dict(self.counters),
            "skipped": self.skipped,
        }


def rng_state_to_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def rng_state_from_json(state: list) -> tuple:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


@dataclass
class _State:
    """Everything needed to continue a run; what `save_state` writes."""

    dev_ids: list[str]
    train_ids: list[str]
    pool: list[Candidate]
    budget: MetricBudget
    rng: random.Random
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    pending_parents: list[int] = field(default_factory=list)  # this iteration's parents...
    parent_cursor: int = 0  # ...and how many of them are done
    finished: bool = False
    last_error: str | None = None


def split_hard_set(ids: Sequence[str], dev_size: int, seed: int) -> tuple[list[str], list[str]]:
    """The authors' dev/train split (`_split_gepa_dataset` with an int dev_ratio, `_resolve_ratio_count`).

    Shuffle, then dev = the first min(dev_size, n // 2) ids, train = all the others: half/half (dev the smaller
    half when n is odd) below their threshold n < 1.5 · dev_size, where n // 2 < dev_size anyway, and
    dev = dev_size once n ≥ 2 · dev_size. Dev keeps the hard set's order (they collect it from a set of indices),
    train the shuffled order. The two never overlap; with n < 2 dev is empty.
    """
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    dev_positions = set(order[: min(dev_size, len(ids) // 2)])
    dev = [ids[i] for i in sorted(dev_positions)]
    train = [ids[i] for i in order if i not in dev_positions]
    return dev, train


class GEPAEngine:
    def __init__(self, hard_items: Sequence[HardItem], evaluate: Evaluate, propose: Propose | None,
                 settings: GEPASettings, *, tokenizer=None, mutation: Mutation | None = None):
        """propose: the reflection LLM, for GEPA's reflective mutation; or mutation: another operator in the same
        slot (then propose is None). tokenizer: counts tokens to fit the reflection feedback (the policy's; the
        authors count with it for every reflection model); None keeps every response whole."""
        self.items = list(hard_items)
        self.by_id = {item.id: item for item in self.items}
        if len(self.by_id) != len(self.items):
            raise ValueError("hard item ids must be unique")
        if settings.gepa.dev_size < 1 or settings.gepa.minibatch_size < 1:
            raise ValueError("gepa.dev_size and gepa.minibatch_size must be >= 1")
        if (propose is None) == (mutation is None):
            raise ValueError("give the engine either propose (reflective mutation) or a mutation operator")
        self.evaluate, self.settings = evaluate, settings
        self.tokenizer = tokenizer
        self.mutation: Mutation = mutation or ReflectiveMutation(
            propose, tokenizer=tokenizer, feedback_token_budget=settings.feedback_token_budget)
        self.state: _State | None = None

    # ----- setup ---------------------------------------------------------------------------------------------

    def split(self) -> tuple[list[str], list[str]]:
        return split_hard_set([item.id for item in self.items], self.settings.gepa.dev_size, self.settings.gepa.seed)

    def budget_total(self, dev_size: int) -> int:
        gepa = self.settings.gepa
        if gepa.max_metric_calls is not None:
            return gepa.max_metric_calls
        return auto_budget(AUTO_CANDIDATES[gepa.auto], dev_size)

    def _fresh_state(self) -> _State:
        dev_ids, train_ids = self.split()
        budget = MetricBudget(self.budget_total(len(dev_ids)))
        if not budget.can_afford(len(dev_ids)):
            raise ValueError(f"budget of {budget.total} metric calls cannot even evaluate the seed on the dev set")
        state = _State(dev_ids, train_ids, [], budget, random.Random(self.settings.gepa.seed))
        state.pool.append(Candidate("", None, self._score(state, "", dev_ids)))
        return state

    # ----- checkpointing -------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        s = self.settings.gepa
        return {"seed": s.seed, "dev_size": s.dev_size, "minibatch_size": s.minibatch_size,
                "num_parents": s.num_parents, "parent_selection": s.parent_selection,
                "hard_ids": sorted(self.by_id)}  # fmt: skip

    def save_state(self, path: str | Path) -> None:
        st = self.state
        assert st is not None
        payload = {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "dev_ids": st.dev_ids,
            "train_ids": st.train_ids,
            "pool": [asdict(c) for c in st.pool],
            "budget": st.budget.state_dict(),
            "rng_state": rng_state_to_json(st.rng.getstate()),
            "counters": st.counters,
            "pending_parents": st.pending_parents,
            "parent_cursor": st.parent_cursor,
            "finished": st.finished,
            "last_error": st.last_error,
        }
        atomic_write_text(path, json.dumps(payload))

    def load_state(self, path: str | Path) -> None:
        payload = json.loads(Path(path).read_text())
        if payload["version"] != STATE_VERSION or payload["fingerprint"] != self._fingerprint():
            raise ValueError(f"{path} was written by a different GEPA run (settings or hard set differ)")
        rng = random.Random()
        rng.setstate(rng_state_from_json(payload["rng_state"]))
        budget = MetricBudget(0)
        budget.load_state_dict(payload["budget"])
        self.state = _State(
            dev_ids=payload["dev_ids"], train_ids=payload["train_ids"],
            pool=[Candidate(**c) for c in payload["pool"]], budget=budget, rng=rng,
            counters={**dict.fromkeys(COUNTER_NAMES, 0), **payload["counters"]},
            pending_parents=payload["pending_parents"], parent_cursor=payload["parent_cursor"],
            finished=payload["finished"], last_error=payload["last_error"],
        )  # fmt: skip

    # ----- the loop ------------------------------------------------------------------------------------------

    def _score(self, st: _State, template: str, ids: list[str]) -> list[float]:
        return [e.score for e in self._run(st, template, ids)]

    def _run(self, st: _State, template: str, ids: list[str]) -> list[Evaluation]:
        """Evaluate and charge; charged only once the rollouts came back (a crash before that charges nothing)."""
        evals = self.evaluate(template, [self.by_id[i] for i in ids])
        if len(evals) != len(ids):
            raise ValueError(f"evaluate returned {len(evals)} results for {len(ids)} items")
        st.budget.charge(len(ids))
        return evals

    def _parent_step(self, st: _State, parent_index: int) -> bool:
        """One mutation of one parent (reflective, or the configured operator). False when the budget ended the run.

        Budget rule: a step starts only if both minibatch evaluations (parent and child, 2B) are affordable, so a
        reflection call is never wasted on a child we could not score. An accepted child whose full dev evaluation
        is no longer affordable is dropped (counted in dropped_for_budget) and the run ends.
        """
        counters = st.counters
        batch_size = min(self.settings.gepa.minibatch_size, len(st.train_ids))
        if not st.budget.can_afford(2 * batch_size):
            return False
        counters["parent_steps"] += 1
        parent = st.pool[parent_index]
        batch = st.rng.sample(st.train_ids, batch_size)
        parent_evals = self._run(st, parent.template, batch)
        if all(solved(e.score) for e in parent_evals):
            counters["skipped_perfect"] += 1  # nothing to learn from, and a child could not strictly improve
            return True

        records = [
            FeedbackRecord(self.by_id[i].question, e.response, self.by_id[i].ground_truth, e.score, e.format_ok)
            for i, e in zip(batch, parent_evals)
        ]
        counters["proposed"] += 1
        try:
            child = self.mutation(parent.template, records, st.rng)
        except MutationFailed as exc:
            counters["failed"] += 1
            st.last_error = str(exc)
            return True
        if child is None:
            counters["invalid"] += 1
            return True
        if any(child == c.template for c in st.pool):
            counters["duplicate"] += 1
            return True

        child_evals = self._run(st, child, batch)
        if sum(e.score for e in child_evals) <= sum(e.score for e in parent_evals):
            counters["rejected"] += 1
            return True
        if not st.budget.can_afford(len(st.dev_ids)):
            counters["dropped_for_budget"] += 1
            return False
        st.pool.append(Candidate(child, parent_index, self._score(st, child, st.dev_ids)))
        counters["accepted"] += 1
        return True

    def run(self, state_path: str | Path | None = None) -> GEPAResult:
        """Run to the end of the budget, resuming from `state_path` if it exists; checkpoint after each step."""
        s = self.settings.gepa
        if len(self.items) < max(s.min_hard, 2):  # 2: the smallest hard set with a dev item
            return GEPAResult([], [], [], {}, 0, 0, dict.fromkeys(COUNTER_NAMES, 0), skipped=True)
        if state_path is not None and Path(state_path).exists():
            self.load_state(state_path)
        else:
            self.state = self._fresh_state()
            self._checkpoint(state_path)
        st = self.state
        assert st is not None
        while not st.finished:
            if st.parent_cursor >= len(st.pending_parents):
                scores = [c.dev_scores for c in st.pool]
                st.pending_parents = select_parents(scores, s.num_parents, st.rng, s.parent_selection)
                st.parent_cursor = 0
                st.counters["iterations"] += 1
            keep_going = self._parent_step(st, st.pending_parents[st.parent_cursor])
            st.parent_cursor += 1
            st.finished = not keep_going
            self._checkpoint(state_path)
        return self.result()

    def _checkpoint(self, state_path: str | Path | None) -> None:
        if state_path is not None:
            self.save_state(state_path)

    def result(self) -> GEPAResult:
        """Cover set and per-sample template assignments for the final pool (own RNG: independent of resumes)."""
        st = self.state
        assert st is not None
        scores = [c.dev_scores for c in st.pool]
        cover = greedy_set_cover(scores)
        rng = random.Random(f"gepa-assign:{self.settings.gepa.seed}")
        hard_ids = [item.id for item in self.items]
        assignments = assign_templates(hard_ids, st.dev_ids, scores, cover, self.settings.templates_per_sample, rng)
        return GEPAResult(
            pool=list(st.pool), dev_ids=list(st.dev_ids), cover=cover, assignments=assignments,
            budget_used=st.budget.used, budget_total=st.budget.total, counters=dict(st.counters),
        )  # fmt: skip
