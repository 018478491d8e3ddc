"""The learner side of a step: the megatron policy (and the optional frozen reference), the step's micro-batches,
log-probs, the refit check (the engine's log-probs against the learner's on the same tokens) and the update."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from p2o_hpc.algo.core_algos import get_advantage_estimator
from p2o_hpc.algo.policy_loss import make_policy_loss_fn
from p2o_hpc.algo.rollout_batch import PAD_ID, group_ids, mini_batch_indices, rank_micro_batches, response_slice, \
    rewards_tensor
from p2o_hpc.megatron.forward import forward_collect, next_token_logprobs
from p2o_hpc.megatron.hf_weights import export_hf_weights, load_hf_weights, save_hf_folder
from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config, read_hf_architecture
from p2o_hpc.megatron.training import LRSchedule, build_learner, train_step
from p2o_hpc.records import Rollout, StepBatch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RefitCheckError(RuntimeError):
    """The engine's log-probs disagree with the learner's on the same tokens: weights are out of sync."""


def warmup_optimizer_steps(algo, run_steps: int, mini_batches_per_step: int) -> int:
    """Linear LR warm-up length in optimizer steps: algorithm.warmup_steps, else the authors' verl rule
    int(warmup_ratio × the run's trainer steps), counted in trainer steps there (one scheduler step per trainer
    step) and so multiplied by the mini-batches of a step here (megatron's scheduler steps per optimizer step).
    run_steps is the run's length, algorithm.max_steps included, like the LR schedule's horizon."""
    optimizer_steps = run_steps * mini_batches_per_step
    if algo.warmup_steps >= max(optimizer_steps, 1):
        raise ValueError(f"algorithm.warmup_steps={algo.warmup_steps} must be shorter than the run's "
                         f"{optimizer_steps} optimizer steps ({run_steps} steps × {mini_batches_per_step} mini-batches)")
    if algo.warmup_steps:
        return algo.warmup_steps
    return int(algo.warmup_ratio * run_steps) * mini_batches_per_step


class LearnerSide:
    def __init__(self, cfg, model_dir: str, total_steps: int):
        self.cfg, self.algo, self.model_dir = cfg, cfg.algorithm, model_dir
        self.arch = read_hf_architecture(model_dir)
        dtype = DTYPES[str(cfg.model.params_dtype)]
        mini_batches = self.algo.prompts_per_step // self.algo.mini_batch_prompts
        schedule = LRSchedule(warmup_steps=warmup_optimizer_steps(self.algo, total_steps, mini_batches),
                              total_steps=total_steps * mini_batches)
        self.learner = build_learner(self.arch, model_dir, self.algo, schedule, dtype)
        self.reference = self._frozen_reference(dtype) if self.algo.kl_coef > 0 else None
        self.loss_fn = make_policy_loss_fn(self.arch.vocab_size, self.algo)
        self.advantage_fn = get_advantage_estimator(self.algo.advantage)
        self.bucket_bytes = cfg.rollout.weight_sync_bucket_mb * 1024**2

    def _frozen_reference(self, dtype):
        """The initial policy for the (optional) KL term."""
        model = build_gpt_model(self.arch, build_transformer_config(self.arch, params_dtype=dtype))
        load_hf_weights(model, self.model_dir, self.arch)
        model.requires_grad_(False)
        return model

    def advantages(self, batch: StepBatch) -> torch.Tensor:
        return self.advantage_fn(rewards_tensor(batch.rollouts), group_ids(batch.rollouts), eps=self.algo.adv_eps)

    def micro_batches(self, batch: StepBatch) -> list[list[dict]]:
        """This DP rank's micro-batches, per mini-batch (one optimizer step each)."""
        dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        return [rank_micro_batches(batch.rollouts, batch.advantages, indices, dp_rank=dp_rank, dp_size=dp_size,
                                   micro_batch_size=self.algo.micro_batch_size, pad_id=PAD_ID)
                for indices in mini_batch_indices(len(batch.problems), self.algo.n_samples, self.algo.mini_batch_prompts)]

    def logprobs(self, micro_batches: list[dict], key: str, model=None) -> None:
        """Attach `key` = the model's next-token log-probs to each micro-batch (on the last pipeline stage)."""
        results = forward_collect(
            model or self.learner.model, micro_batches,
            lambda batch, logits: {"logprobs": next_token_logprobs(logits, batch["input_ids"], self.arch.vocab_size)},
        )
        for batch, result in zip(micro_batches, results):
            batch[key] = result["logprobs"]

    def old_logprobs(self, micro_batches: list[dict]) -> None:
        self.logprobs(micro_batches, "old_logprobs")
        if self.reference is not None:
            self.logprobs(micro_batches, "ref_logprobs", model=self.reference)

    def update(self, mini_batches: list[list[dict]]) -> list[dict]:
        return [train_step(self.learner, micro_batches, self.loss_fn) for micro_batches in mini_batches]

    def weight_buckets(self):
        """Collective: the policy in HF names, in buckets (every rank takes part in the gathers)."""
        return export_hf_weights(self.learner.model, self.arch, bucket_bytes=self.bucket_bytes)

    def save_hf(self, folder) -> None:
        """Collective: the policy as a Hugging Face folder (rank 0 writes)."""
        save_hf_folder(self.learner.model, self.arch, self.model_dir, folder, write=dist.get_rank() == 0,
                       bucket_bytes=self.bucket_bytes)

    def refit_check(self, step: int, rollouts: list[Rollout], micro_batches: list[dict], engine) -> dict:
        """Collective: the engine's log-probs of the first rollout.refit_check_sequences responses against the
        learner's old log-probs; a gap over rollout.refit_tolerance stops the run (the engine has stale weights)."""
        count = min(self.cfg.rollout.refit_check_sequences, len(rollouts))
        mine = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
            for batch in micro_batches:
                for row, index in enumerate(batch["rollout_index"].tolist()):
                    if index < count:
                        mine[index] = batch["old_logprobs"][row, response_slice(rollouts[index])].tolist()
        learner_parts = [None] * dist.get_world_size()
        dist.all_gather_object(learner_parts, mine)
        verdict = [None]
        if dist.get_rank() == 0:
            learner = {index: values for part in learner_parts for index, values in part.items()}
            engine_logprobs = engine.prompt_logprobs([rollouts[i].sequence for i in range(count)])
            gaps = []
            for index in range(count):
                engine_response = engine_logprobs[index][len(rollouts[index].prompt_ids):]
                gaps.extend(abs(a - b) for a, b in zip(engine_response, learner[index]))
            verdict[0] = {"rollout/logprob_gap_mean": float(np.mean(gaps)) if gaps else 0.0,
                          "rollout/logprob_gap_max": float(np.max(gaps)) if gaps else 0.0}
        dist.broadcast_object_list(verdict, src=0)
        gap = verdict[0]["rollout/logprob_gap_max"]
        if not gap <= self.cfg.rollout.refit_tolerance:  # NaN fails too
            raise RefitCheckError(
                f"step {step}: max |generator − learner| log-prob gap {gap:.4g} > rollout.refit_tolerance="
                f"{self.cfg.rollout.refit_tolerance}: the generator is not running the learner's weights"
            )
        return verdict[0]
