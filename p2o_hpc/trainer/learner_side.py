"""The learner side of a step: the megatron policy (and the optional frozen reference), the step's micro-batches,
log-probs, the refit check (the engine's log-probs against the learner's on the same tokens) and the update."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from p2o_hpc.algo.core_algos import get_advantage_estimator
from p2o_hpc.algo.policy_loss import make_policy_loss_fn
from p2o_hpc.algo.rollout_batch import PAD_ID, group_ids, mini_batch_indices, padding_fraction, rank_micro_batches, \
    response_slice, rewards_tensor
from p2o_hpc.megatron.distributed import control_group
from p2o_hpc.megatron.forward import forward_collect, next_token_logprobs
from p2o_hpc.megatron.hf_weights import export_hf_weights, load_hf_weights, save_hf_folder
from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config, read_hf_architecture
from p2o_hpc.megatron.training import LRSchedule, build_learner, memory_settings, train_step
from p2o_hpc.records import Rollout, StepBatch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RefitCheckError(RuntimeError):
    """The engine's log-probs disagree with the learner's on the same tokens: weights are out of sync."""


def refit_metrics(engine: dict[int, list[float]], learner: dict[int, list[float]]) -> dict:
    """Engine vs learner log-probs of the same response tokens (per rollout index). The check's statistic is
    NeMo-RL's token multiplicative probability error, the mean over tokens of exp(|Δ log p|): 1 when they agree,
    1.05 when a token's probability is off by 5 % on average. Unlike the max gap (also logged) it does not trip on
    the odd bf16 outlier among tens of thousands of tokens, and a NaN or inf anywhere makes it fail."""
    gaps = []
    for index in sorted(engine):
        theirs = learner.get(index)
        if theirs is None or len(theirs) != len(engine[index]):
            raise ValueError(f"refit check: rollout {index} has {len(engine[index])} engine log-probs but "
                             f"{'no' if theirs is None else len(theirs)} learner ones")
        gaps.extend(abs(a - b) for a, b in zip(engine[index], theirs))
    if not gaps:
        return {"rollout/token_prob_error": 1.0, "rollout/logprob_gap_mean": 0.0, "rollout/logprob_gap_max": 0.0}
    gaps = np.asarray(gaps, dtype=np.float64)
    with np.errstate(over="ignore"):
        error = float(np.mean(np.exp(gaps)))
    return {"rollout/token_prob_error": error, "rollout/logprob_gap_mean": float(np.mean(gaps)),
            "rollout/logprob_gap_max": float(np.max(gaps))}


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
        self.learner = build_learner(self.arch, model_dir, self.algo, schedule, dtype,
                                     **memory_settings(cfg.parallel))
        self.reference = self._frozen_reference(dtype) if self.algo.kl_coef > 0 else None
        self.chunk_tokens = cfg.parallel.logprob_chunk_tokens
        self.loss_fn = make_policy_loss_fn(self.arch.vocab_size, self.algo, logprob_chunk_tokens=self.chunk_tokens)
        self.advantage_fn = get_advantage_estimator(self.algo.advantage)
        self.bucket_bytes = cfg.rollout.weight_sync_bucket_mb * 1024**2

    def _frozen_reference(self, dtype):
        """The initial policy for the (optional) KL term."""
        config = build_transformer_config(self.arch, params_dtype=dtype,
                                          sequence_parallel=self.cfg.parallel.sequence_parallel)
        model = build_gpt_model(self.arch, config)
        load_hf_weights(model, self.model_dir, self.arch)
        model.requires_grad_(False)
        return model

    def advantages(self, batch: StepBatch) -> torch.Tensor:
        return self.advantage_fn(rewards_tensor(batch.rollouts), group_ids(batch.rollouts), eps=self.algo.adv_eps)

    def micro_batches(self, batch: StepBatch) -> list[list[dict]]:
        """This DP rank's micro-batches, per mini-batch (one optimizer step each), on the learner's device."""
        dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        return [rank_micro_batches(batch.rollouts, batch.advantages, indices, dp_rank=dp_rank, dp_size=dp_size,
                                   micro_batch_size=self.algo.micro_batch_size, pad_id=PAD_ID,
                                   micro_batch_tokens=self.algo.micro_batch_tokens,
                                   device=torch.cuda.current_device())
                for indices in mini_batch_indices(len(batch.problems), self.algo.n_samples, self.algo.mini_batch_prompts)]

    def batching_metrics(self, micro_batches: list[dict]) -> dict:
        """This DP rank's micro-batches of the step: how many, and the share of the layers' token slots that hold
        padding (0 when packed)."""
        return {"perf/micro_batches": len(micro_batches),
                "perf/padding_frac": padding_fraction(micro_batches, packed=self.learner.pack_sequences)}

    def logprobs(self, micro_batches: list[dict], key: str, model=None) -> None:
        """Attach `key` = the model's next-token log-probs to each micro-batch (on the last pipeline stage)."""
        results = forward_collect(
            model or self.learner.model, micro_batches,
            lambda batch, logits: {"logprobs": next_token_logprobs(logits, batch["input_ids"], self.arch.vocab_size,
                                                                   self.chunk_tokens)},
            pack=self.learner.pack_sequences,
        )
        for batch, result in zip(micro_batches, results):
            batch[key] = result["logprobs"]

    def old_logprobs(self, micro_batches: list[dict]) -> None:
        self.logprobs(micro_batches, "old_logprobs")
        if self.reference is not None:
            self.logprobs(micro_batches, "ref_logprobs", model=self.reference)

    def update(self, mini_batches: list[list[dict]]) -> list[dict]:
        return [train_step(self.learner, micro_batches, self.loss_fn) for micro_batches in mini_batches]

    def weight_buckets(self, *, receive: bool = True):
        """Collective: the policy in HF names, in buckets (every rank takes part in the gathers and iterates them);
        only a rank with `receive` gets the tensors (the driver: the ranks that host an engine)."""
        return export_hf_weights(self.learner.model, self.arch, bucket_bytes=self.bucket_bytes, receive=receive)

    def save_hf(self, folder) -> None:
        """Collective: the policy as a Hugging Face folder (rank 0 writes)."""
        save_hf_folder(self.learner.model, self.arch, self.model_dir, folder, write=dist.get_rank() == 0,
                       bucket_bytes=self.bucket_bytes)

    def refit_check(self, step: int, rollouts: list[Rollout], micro_batches: list[dict],
                    engine_logprobs: dict[int, list[float]]) -> dict:
        """Collective: the engine's response log-probs of the first rollouts (`engine_logprobs`, by rollout index, on
        every rank; computed by the engine hosts with the weights of these old log-probs) against the learner's old
        log-probs; a token probability error above 1 + rollout.refit_tolerance stops the run (stale weights)."""
        mine = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
            for batch in micro_batches:
                for row, index in enumerate(batch["rollout_index"].tolist()):
                    if index in engine_logprobs:
                        mine[index] = batch["old_logprobs"][row, response_slice(rollouts[index])].tolist()
        learner_parts = [None] * dist.get_world_size()
        dist.all_gather_object(learner_parts, mine, group=control_group())
        learner = {index: values for part in learner_parts for index, values in part.items()}
        metrics = refit_metrics(engine_logprobs, learner)  # the same inputs on every rank: the same verdict
        error, tolerance = metrics["rollout/token_prob_error"], self.cfg.rollout.refit_tolerance
        if not error <= 1.0 + tolerance:  # NaN fails too
            raise RefitCheckError(
                f"step {step}: token probability error mean(exp|generator − learner log-prob|) = {error:.4g} > "
                f"1 + rollout.refit_tolerance={tolerance} (max gap {metrics['rollout/logprob_gap_max']:.4g}): "
                "the generator is not running the learner's weights"
            )
        return metrics
