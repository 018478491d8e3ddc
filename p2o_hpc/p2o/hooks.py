"""P²O as GRPO's hooks: last epoch's hard prompts roll out under their evolved templates, those rollouts train
on the original prompt with per-token context-distillation weights, and each epoch ends with a GEPA round.

Differences from plain GRPO, all here: (1) a prompt with templates gets them for its K rollouts
(`templates_for`, drawn by GEPA's Algorithm 2); (2) a templated rollout keeps its response but trains on x, and its
tokens whose π(y|x)/π(y|x̃) leaves [1 − cd_clip_low, 1 + cd_clip_high] are dropped (hard) or scaled (soft) —
`token_weights`; (3) the epoch's hard set goes to GEPA and its templates serve the next epoch (`end_epoch`,
blocking or overlapped).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from p2o_hpc.algo.context_distillation import micro_batch_cd_weights
from p2o_hpc.algo.hooks import AlgorithmHooks, LogprobFn, Policy
from p2o_hpc.algo.rollout_batch import PAD_ID, generation_micro_batch
from p2o_hpc.megatron.distributed import control_group
from p2o_hpc.p2o.template_exchange import TemplateExchange
from p2o_hpc.records import Problem, StepBatch
from p2o_hpc.run_dir import RunDir


def rollout_templates(assigned: list[str] | None, k: int, *, same_template_in_group: bool,
                      keep_one_plain_rollout: bool) -> list[str]:
    """The K templates of one prompt's rollouts: its draws (cycled if fewer than K), "" when it has none."""
    if not assigned:
        return [""] * k
    templates = [assigned[0]] * k if same_template_in_group else [assigned[i % len(assigned)] for i in range(k)]
    if keep_one_plain_rollout:
        templates[0] = ""
    return templates


class P2OHooks(AlgorithmHooks):
    def __init__(self, cfg, run_dir: RunDir, *, rank: int, console):
        self.p2o = cfg.algorithm.p2o
        self.distill = self.p2o.context_distillation
        self.exchange = TemplateExchange(cfg, run_dir, rank=rank, console=console)

    def next_problems(self, loader) -> tuple[list[Problem], dict]:
        gate = self.exchange.before_batch(loader)
        problems = loader.next_batch()
        return problems, {**gate, **self.exchange.batch_metrics(problems)}

    def templates_for(self, problems: list[Problem], k: int) -> list[list[str]] | None:
        assignments = self.exchange.assignments
        if not any(problem.id in assignments for problem in problems):
            return None
        return [rollout_templates(assignments.get(problem.id), k, same_template_in_group=self.p2o.same_template_in_group,
                                  keep_one_plain_rollout=self.p2o.keep_one_plain_rollout)
                for problem in problems]

    def token_weights(self, batch: StepBatch, micro_batches: list[dict], logprobs: LogprobFn) -> dict:
        """Collective: log π(y|x̃) of the templated rollouts next to the old log π(y|x), then the CD weights."""
        rollouts = batch.rollouts
        if not (self.distill and any(r.distilled for r in rollouts)):
            return {}
        pairs = [(mb, generation_micro_batch(rollouts, mb, PAD_ID)) for mb in micro_batches]
        pairs = [(mb, templated) for mb, templated in pairs if templated is not None]
        if pairs:  # the same on every rank of a model-parallel group (they hold the same micro-batches)
            logprobs([templated for _, templated in pairs], "templated_logprobs")
        ratios, weights = [], []
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for mb, templated in pairs:
                mb["cd_weight"], ratio, weight = micro_batch_cd_weights(
                    rollouts, mb, templated["templated_logprobs"], low=self.p2o.cd_clip_low,
                    high=self.p2o.cd_clip_high, mode=self.p2o.cd_mask)
                ratios.append(ratio)
                weights.append(weight)
        mine = None
        if ratios and parallel_state.get_tensor_model_parallel_rank() == 0:
            ratio, weight = torch.cat(ratios).double(), torch.cat(weights).double()
            if ratio.numel():
                mine = [float((weight < 1).sum()), float(ratio.numel()), float(ratio.sum()), float(ratio.min()),
                        float(ratio.max())]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine, group=control_group())
        parts = [part for part in parts if part is not None]
        if not parts:
            return {}
        tokens = sum(part[1] for part in parts)
        return {"p2o/cd_masked_frac": sum(part[0] for part in parts) / tokens,
                "p2o/cd_ratio_mean": sum(part[2] for part in parts) / tokens,
                "p2o/cd_ratio_min": min(part[3] for part in parts),
                "p2o/cd_ratio_max": max(part[4] for part in parts)}

    def step_metrics(self, batch: StepBatch) -> dict:
        """Reward under templates vs on the plain prompt, and whether hard prompts got their gradient back."""
        rollouts = batch.rollouts
        templated = [r.reward for r in rollouts if r.template]
        plain = [r.reward for r in rollouts if not r.template]
        assignments = self.exchange.assignments
        k = len(rollouts) // max(1, len(batch.problems))
        hard_groups = [i for i, problem in enumerate(batch.problems) if problem.id in assignments]
        metrics = {"p2o/templated_frac": len(templated) / max(1, len(rollouts)),
                   "p2o/templates_rejected": batch.templates_rejected,
                   "p2o/assigned_prompts": len(assignments)}
        if templated:
            metrics["p2o/reward_templated"] = float(np.mean(templated))
        if plain:
            metrics["p2o/reward_plain"] = float(np.mean(plain))
        if hard_groups:
            zero = [bool((batch.advantages[i * k: (i + 1) * k] == 0).all()) for i in hard_groups]
            metrics["p2o/hard_zero_adv_frac"] = float(np.mean(zero))
        return metrics

    def validation_template(self) -> str | None:
        """The current round's best-on-dev template (RunDir.best_template): held-out problems never got one."""
        return self.exchange.best_template

    def end_epoch(self, epoch: int, hard_ids: list[str], loader, policy: Policy, *, last: bool) -> dict:
        return {} if last else self.exchange.end_epoch(epoch, hard_ids, loader, policy)

    def state_dict(self) -> dict:
        return self.exchange.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.exchange.load_state_dict(state)

    def close(self) -> None:
        self.exchange.close()
