"""The rollout side of a step: engine hosts (rollout.engines_per_node per node, by default one per GPU, each engine
on its host's own GPU) generate and grade their share of the prompts; every rank receives all rollouts; with
one-step off-policy the next batch is generated during the update.

The engine's half of the refit check (its log-probs of the batch's first rollouts) is computed by the hosts while
the engine is awake and holds the weights the learner's old log-probs use: right after generating on-policy, after
the step's weight sync for a batch generated ahead. Seeds depend only on (step, prompt, sample), so a resumed run
regenerates exactly what it would have.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.megatron.distributed import control_group
from p2o_hpc.records import Problem, Rollout, StepBatch
from p2o_hpc.rollout.generator import SamplingSettings
from p2o_hpc.trainer.metrics import PhaseTimer


def engines_per_node(rollout, ranks_per_node: int, cuda: bool) -> int:
    """rollout.engines_per_node, or its default: one per GPU when the ranks run on CUDA, else one per node (a vLLM-CPU
    engine is a process with threads of its own; one per rank would oversubscribe the node's cores)."""
    if rollout.engines_per_node is not None:
        return rollout.engines_per_node
    return ranks_per_node if cuda else 1


def hosts_engine(local_rank: int, ranks_per_node: int, engines: int) -> bool:
    """Whether this local rank hosts one of its node's `engines` engines: every (ranks_per_node / engines)-th."""
    return local_rank % (ranks_per_node // engines) == 0


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

    def generate(self, batch: StepBatch, step: int, timer: PhaseTimer,
                 refit_sequences: int = 0) -> tuple[StepBatch, dict[int, list[float]]]:
        """Collective: `batch` with every host's rollouts (prompt-major), generated now; and the engine's response
        log-probs of its first `refit_sequences` rollouts by rollout index (the refit check's engine half, computed
        before the engine sleeps)."""
        share = self._host_share(batch, step, refit_sequences) if self.engine is not None else None
        self.release_engine()
        with timer.phase("rollout_wait"):
            shares = self._all_shares(share)
        if refit_sequences:
            engine_s = max(part["refit_s"] for part in shares)  # the slowest host's engine half
            timer.seconds["refit_check"] = timer.seconds.get("refit_check", 0.0) + engine_s
        return self._merge(batch, shares), {index: values for part in shares
                                            for index, values in part["engine_logprobs"].items()}

    def engine_logprobs(self, batch: StepBatch, count: int) -> dict[int, list[float]]:
        """Collective: the engine's response log-probs of the batch's first `count` rollouts, by rollout index, each
        computed by the host that generated it; the engines must be awake and hold the learner's weights (a batch
        generated ahead, after this step's weight sync)."""
        if not count:
            return {}
        mine = None
        if self.engine is not None:
            start, stop = self._share_range(len(batch.problems))
            k = self.algo.n_samples
            mine = self._engine_response_logprobs(batch.rollouts[start * k:min(stop * k, count)], start * k)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine, group=control_group())
        return {index: values for rank in self.host_ranks for index, values in parts[rank].items()}

    def start_ahead(self, batch: StepBatch, step: int) -> Future | None:
        """On hosts: start generating `batch` (step `step`) in the background with the engine's current weights."""
        return self.ahead.submit(self._host_share, batch, step) if self.ahead is not None else None

    def finish_ahead(self, batch: StepBatch, started: Future | None) -> StepBatch:
        """Collective: the batch started by start_ahead, gathered on every rank."""
        return self._merge(batch, self._all_shares(started.result() if started is not None else None))

    def _share_range(self, count: int) -> tuple[int, int]:
        """[start, stop) of this host's share of `count` prompts."""
        share = count / len(self.host_ranks)
        index = self.host_ranks.index(self.rank)
        return round(index * share), round((index + 1) * share)

    def _host_share(self, batch: StepBatch, step: int, refit_sequences: int = 0) -> dict:
        """On a host: generate and grade this host's share of the prompts (timed); the engine's log-probs of those
        of its rollouts among the batch's first `refit_sequences`, while it still holds the weights it sampled with."""
        start, stop = self._share_range(len(batch.problems))
        problems = batch.problems[start:stop]
        timer = PhaseTimer()  # this host's phases (ranges on its timeline); a step keeps the slowest host's (_merge)
        with timer.phase("generate"):
            templates, rejected = self.hooks.templates_for(problems, self.algo.n_samples), 0
            if templates is not None:
                templates, rejected = self.engine.checked_templates(templates)
            rollouts = self.engine.generate(problems, start, self.sampling(step, start), templates,
                                            distill=self.hooks.distill)
        first = start * self.algo.n_samples  # the batch's rollouts are prompt-major, K per prompt
        with timer.phase("refit_check"):
            engine_logprobs = self._engine_response_logprobs(rollouts[:max(0, refit_sequences - first)], first)
        with timer.phase("reward"):
            self.engine.score(rollouts, [batch.problems[r.prompt_index].answer for r in rollouts])
        seconds = timer.seconds
        return {"rollouts": rollouts, "generate_s": seconds["generate"], "reward_s": seconds["reward"],
                "templates_rejected": rejected, "engine_logprobs": engine_logprobs, "refit_s": seconds["refit_check"]}

    def _engine_response_logprobs(self, rollouts: list[Rollout], first: int) -> dict[int, list[float]]:
        """The engine's log-probs of each rollout's response tokens, conditioned on the prompt the learner trains on
        (the original one under context distillation), keyed by batch index from `first`."""
        if not rollouts:
            return {}
        values = self.engine.prompt_logprobs([rollout.sequence for rollout in rollouts])
        return {first + i: row[len(rollout.prompt_ids):] for i, (rollout, row) in enumerate(zip(rollouts, values))}

    def graded(self, problems: list[Problem], sampling: SamplingSettings, template: str = "") -> list | None:
        """Collective (held-out scoring): per problem (rewards, response lengths) of its sampling.n samples, every
        one under `template` ("" = the original prompt), generated and graded by the engine hosts, each its share;
        on every rank. A problem whose prompt does not fit data.max_prompt_tokens is None (skipped, not an error: a
        held-out set must not stop a training run). None when the engine refuses `template` (its checks)."""
        parts = self._all_shares(self._graded_share(problems, sampling, template) if self.engine is not None else None)
        if any(part is None for part in parts):
            return None
        return [row for part in parts for row in part]

    def _graded_share(self, problems: list[Problem], sampling: SamplingSettings, template: str) -> list | None:
        start, stop = self._share_range(len(problems))
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

    def _all_shares(self, share: dict | None) -> list[dict]:
        """Collective: every host's share, in host order, on every rank."""
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share, group=control_group())
        return [shares[rank] for rank in self.host_ranks]

    @staticmethod
    def _merge(batch: StepBatch, parts: list[dict]) -> StepBatch:
        batch.rollouts = [rollout for part in parts for rollout in part["rollouts"]]
        batch.generate_s = max(part["generate_s"] for part in parts)
        batch.reward_s = max(part["reward_s"] for part in parts)
        batch.templates_rejected = sum(part["templates_rejected"] for part in parts)
        return batch

    def release_engine(self) -> None:
        """Colocated on a GPU, vLLM sleeps while the learner computes log-probs and updates (no-op on CPU); the next
        call that needs it wakes it (GeneratorProcess first hands the learner's cached GPU memory back). Not with
        one-step off-policy: there the engine is busy with the next batch during the update."""
        if self.engine is not None and self.rollout.enable_sleep_mode and not self.schedule.enabled:
            self.engine.sleep()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()
