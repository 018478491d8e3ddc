"""The rollout side of a step: engine hosts (local rank 0 of each node) generate and grade their share of the
prompts; every rank receives all rollouts; with one-step off-policy the next batch is generated during the update.

Seeds depend only on (step, prompt, sample), so a resumed run regenerates exactly what it would have.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.records import StepBatch
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
