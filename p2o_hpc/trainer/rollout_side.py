"""The rollout side of a step: engine hosts (local rank 0 of each node) generate and grade their share of the
prompts; every rank receives all rollouts; with one-step off-policy the next batch is generated during the update.

Seeds depend only on (step, prompt, sample), so a resumed run regenerates exactly what it would have.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.records import Problem, StepBatch
from p2o_hpc.rollout.generator import SamplingSettings
from p2o_hpc.trainer.metrics import PhaseTimer


class OffPolicySchedule:
    """Which weights generate which batch. On-policy: every step generates its own batch after the weight sync.
    One-step off-policy: the first step generates its own; batch t+1 is generated with step t's weights while
    step t updates, and the last step generates nothing ahead."""

    def __init__(self, enabled: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps

    def generate_ahead(self, step: int) -> bool:
        return self.enabled and step + 1 < self.total_steps


class RolloutSide:
    def __init__(self, cfg, engine, host_ranks: list[int], hooks: AlgorithmHooks, schedule: OffPolicySchedule):
        self.rollout, self.algo = cfg.rollout, cfg.algorithm
        self.engine = engine  # RolloutWorker on engine hosts, None elsewhere
        self.host_ranks, self.hooks, self.schedule = host_ranks, hooks, schedule
        self.rank = dist.get_rank()
        self.ahead = ThreadPoolExecutor(1) if schedule.enabled and engine is not None else None

    def sampling(self, step: int, first_prompt: int) -> SamplingSettings:
        seed = self.rollout.seed * 1_000_003 + (step * self.algo.prompts_per_step + first_prompt) * self.algo.n_samples
        return SamplingSettings(n=self.algo.n_samples, temperature=self.rollout.temperature, top_p=self.rollout.top_p,
                                max_tokens=self.rollout.max_response_tokens, seed=seed, logprobs=True)

    def generate(self, batch: StepBatch, step: int, timer: PhaseTimer) -> StepBatch:
        """Collective: `batch` with every host's rollouts (prompt-major), generated now."""
        share = self._host_share(batch, step) if self.engine is not None else None
        self.release_engine()
        with timer.phase("rollout_wait"):
            return self._gather(batch, share)

    def start_ahead(self, batch: StepBatch, step: int) -> Future | None:
        """On hosts: start generating `batch` (step `step`) in the background with the engine's current weights."""
        return self.ahead.submit(self._host_share, batch, step) if self.ahead is not None else None

    def finish_ahead(self, batch: StepBatch, started: Future | None) -> StepBatch:
        """Collective: the batch started by start_ahead, gathered on every rank."""
        return self._gather(batch, started.result() if started is not None else None)

    def _host_share(self, batch: StepBatch, step: int) -> dict:
        """On a host: generate and grade this host's share of the prompts (timed)."""
        share = len(batch.problems) / len(self.host_ranks)
        index = self.host_ranks.index(self.rank)
        start, stop = round(index * share), round((index + 1) * share)
        problems = batch.problems[start:stop]
        started = time.perf_counter()
        templates, rejected = self.hooks.templates_for(problems, self.algo.n_samples), 0
        if templates is not None:
            templates, rejected = self.engine.checked_templates(templates)
        rollouts = self.engine.generate(problems, start, self.sampling(step, start), templates,
                                        distill=self.hooks.distill)
        generated = time.perf_counter()
        self.engine.score(rollouts, [batch.problems[r.prompt_index].answer for r in rollouts])
        return {"rollouts": rollouts, "generate_s": generated - started, "reward_s": time.perf_counter() - generated,
                "templates_rejected": rejected}

    def graded(self, problems: list[Problem], sampling: SamplingSettings, template: str = "") -> list | None:
        """Collective (held-out scoring): per problem (rewards, response lengths) of its sampling.n samples, every
        one under `template` ("" = the original prompt), generated and graded by the engine hosts, each its share;
        on every rank. A problem whose prompt does not fit data.max_prompt_tokens is None (skipped, not an error: a
        held-out set must not stop a training run). None when the engine refuses `template` (its checks)."""
        share = self._graded_share(problems, sampling, template) if self.engine is not None else None
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share)
        parts = [shares[rank] for rank in self.host_ranks]
        if any(part is None for part in parts):
            return None
        return [row for part in parts for row in part]

    def _graded_share(self, problems: list[Problem], sampling: SamplingSettings, template: str) -> list | None:
        share = len(problems) / len(self.host_ranks)
        index = self.host_ranks.index(self.rank)
        start, stop = round(index * share), round((index + 1) * share)
        if template and self.engine.checked_templates([[template]])[1]:
            return None
        mine = problems[start:stop]
        fits = [self._fits(problem, template) for problem in mine]
        kept = [problem for problem, ok in zip(mine, fits) if ok]
        n, rows = sampling.n, []
        if kept:
            # Seeds by the problem's place in the whole set, so the samples do not depend on the number of hosts.
            seed = None if sampling.seed is None else sampling.seed + start * n
            rollouts = self.engine.generate(kept, 0, dataclasses.replace(sampling, seed=seed),
                                            [[template] * n for _ in kept] if template else None)
            self.engine.score(rollouts, [kept[rollout.prompt_index].answer for rollout in rollouts])
            groups = [rollouts[i * n:(i + 1) * n] for i in range(len(kept))]
            rows = [([r.reward for r in group], [len(r.response_ids) for r in group]) for group in groups]
        scored = iter(rows)
        return [next(scored) if ok else None for ok in fits]

    def _fits(self, problem: Problem, template: str) -> bool:
        try:
            self.engine.encode([problem], [template] if template else None)
        except ValueError:  # longer than data.max_prompt_tokens (+ the template budget)
            return False
        return True

    def _gather(self, batch: StepBatch, share: dict | None) -> StepBatch:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share)
        parts = [shares[rank] for rank in self.host_ranks]
        batch.rollouts = [rollout for part in parts for rollout in part["rollouts"]]
        batch.generate_s = max(part["generate_s"] for part in parts)
        batch.reward_s = max(part["reward_s"] for part in parts)
        batch.templates_rejected = sum(part["templates_rejected"] for part in parts)
        return batch

    def release_engine(self) -> None:
        """Colocated on a GPU, vLLM sleeps while the learner computes log-probs and updates (no-op on CPU). Not
        with one-step off-policy: there the engine is busy with the next batch during the update."""
        if self.engine is not None and self.rollout.enable_sleep_mode and not self.schedule.enabled:
            self.engine.sleep()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()
