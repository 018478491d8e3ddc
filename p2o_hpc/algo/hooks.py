"""The points where an algorithm on top of GRPO plugs into the training driver; GRPO itself is the no-op.

P²O (p2o_hpc.p2o.hooks) is one such object: it chooses templates for a batch's rollouts, weights the tokens of
templated rollouts (context distillation) and runs the GEPA exchange at the end of an epoch. The driver calls
the same hooks for every algorithm and imports P²O only when the config asks for it. Hooks marked collective
are called by every rank at the same point of the loop.
"""

from __future__ import annotations

from typing import Callable, Protocol

from p2o_hpc.records import Problem, StepBatch


class Policy(Protocol):
    """What a hook may do with the learner's current policy at an epoch boundary (collective)."""

    engine: object | None  # this rank's rollout engine (RolloutWorker) on engine hosts, else None

    def export_hf(self, folder) -> None:
        """Write the policy as a Hugging Face folder (rank 0 writes, every rank takes part)."""

    def sync_engine(self) -> None:
        """Load the policy into the engine hosts' rollout engines."""


LogprobFn = Callable[[list[dict], str], None]  # (micro-batches, key): attach the policy's log-probs under `key`


class AlgorithmHooks:
    """Plain GRPO: every hook does nothing."""

    #: rollouts generated under a template train on the original prompt (context distillation)
    distill: bool = False

    def next_problems(self, loader) -> tuple[list[Problem], dict]:
        """Collective: the next batch of prompts and any numbers about waiting for it."""
        return loader.next_batch(), {}

    def templates_for(self, problems: list[Problem], k: int) -> list[list[str]] | None:
        """Per problem, the templates of its K rollouts ("" = the original prompt); None: all original."""
        return None

    def token_weights(self, batch: StepBatch, micro_batches: list[dict], logprobs: LogprobFn) -> dict:
        """Collective, after the old log-probs: per-token loss weights (micro-batch key `cd_weight`); metrics."""
        return {}

    def step_metrics(self, batch: StepBatch) -> dict:
        return {}

    def validation_template(self) -> str | None:
        """The template held-out problems are also scored under (validation.with_templates); None: none exists."""
        return None

    def end_epoch(self, epoch: int, hard_ids: list[str], loader, policy: Policy, *, last: bool) -> dict:
        """Collective, after the epoch's hard set is on disk; `last`: the run ends with this epoch."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass
