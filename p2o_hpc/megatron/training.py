"""One optimizer step of a megatron learner: DDP-wrapped GPTModel, megatron optimizer and LR schedule.

The loss is pluggable (`loss_fn(batch, logits_shard) -> (summed_loss, num_tokens[, summed_metrics])`); gradients
are the mean over
every loss token of the *global* batch (all micro-batches, all DP ranks): megatron sums per-token losses
(`calculate_per_token_loss`) and `finalize_model_grads` divides by the global token count.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from p2o_hpc.choices import Recompute
from p2o_hpc.config import AlgorithmConfig, ParallelConfig
from p2o_hpc.megatron.forward import next_token_logprobs, run_schedule
from p2o_hpc.megatron.hf_weights import load_hf_weights
from p2o_hpc.megatron.model_provider import HFArchitecture, build_gpt_model, build_transformer_config

# (batch, logits_shard) -> (summed_loss, normaliser) or (summed_loss, normaliser, {metric: summed value}).
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple]


# The optimizer settings the run config does not hold (lr, weight decay, clipping, decay style are algorithm.*):
# the authors' verl AdamW, and no LR floor.
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
MIN_LR = 0.0


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The LR schedule's length in optimizer steps, which the run's size decides (not a config value)."""

    warmup_steps: int
    total_steps: int


@dataclasses.dataclass
class Learner:
    arch: HFArchitecture
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: int = 0
    pack_sequences: bool = False  # THD packing of each micro-batch (forward.run_schedule's `pack`)


def uses_torch_adamw_fallback() -> bool:
    """True when megatron found neither TE nor Apex and optimises with torch.optim.AdamW."""
    import megatron.core.optimizer as mcore_optimizer

    return mcore_optimizer.Adam is torch.optim.AdamW


def memory_settings(parallel: ParallelConfig) -> dict:
    """build_learner's keyword arguments from parallel.*'s memory and packing keys (the same names)."""
    return {key: getattr(parallel, key) for key in ("use_distributed_optimizer", "grad_reduce_in_fp32",
                                                    "sequence_parallel", "recompute", "recompute_num_layers",
                                                    "pack_sequences")}


def build_learner(
    arch: HFArchitecture,
    hf_dir: str | None,
    algo: AlgorithmConfig,
    schedule: LRSchedule,
    params_dtype: torch.dtype = torch.float32,
    *,
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
    sequence_parallel: bool = False,
    recompute: Recompute | str = Recompute.none,
    recompute_num_layers: int = 1,
    pack_sequences: bool = False,
) -> Learner:
    """parallel_state must be initialised; weights come from `hf_dir` (or stay at megatron's init if None).

    The optimizer is algorithm.* (lr, weight_decay, clip_grad, lr_decay_style) over `schedule`; the keyword
    arguments are parallel.*'s memory and packing keys (`memory_settings(cfg.parallel)`)."""
    if use_distributed_optimizer and uses_torch_adamw_fallback():
        raise ValueError(
            "parallel.use_distributed_optimizer=True needs Transformer-Engine's or Apex's FusedAdam: megatron's "
            "torch.optim.AdamW fallback (CPU, or GPU without TE/Apex) cannot save/load distributed optimizer state "
            "(its shared 0-dim `step` breaks the sharded state dict). Use the plain optimizer here."
        )
    config = build_transformer_config(arch, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                      recompute=recompute, recompute_num_layers=recompute_num_layers,
                                      calculate_per_token_loss=True)
    model = build_gpt_model(arch, config)
    if hf_dir is not None:
        load_hf_weights(model, hf_dir, arch)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=algo.lr,
        min_lr=MIN_LR,
        weight_decay=algo.weight_decay,
        adam_beta1=ADAM_BETA1,
        adam_beta2=ADAM_BETA2,
        adam_eps=ADAM_EPS,
        clip_grad=algo.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if schedule.warmup_steps else algo.lr,
        max_lr=algo.lr,
        min_lr=MIN_LR,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=max(schedule.total_steps, 1),
        lr_decay_style=str(algo.lr_decay_style),  # a plain str: the scheduler's state goes into checkpoints
        start_wd=algo.weight_decay,
        end_wd=algo.weight_decay,
        wd_incr_steps=max(schedule.total_steps, 1),
        wd_incr_style="constant",
    )
    return Learner(arch=arch, model=model, optimizer=optimizer, scheduler=scheduler, pack_sequences=pack_sequences)


def token_nll_loss(arch: HFArchitecture, logprob_chunk_tokens: int = 0) -> LossFn:
    """Summed next-token NLL over `loss_mask` (defaults to all positions): the SFT loss, used by tests and benches."""

    def loss_fn(batch, logits_shard):
        logprobs = next_token_logprobs(logits_shard, batch["input_ids"], arch.vocab_size, logprob_chunk_tokens)
        mask = batch.get("loss_mask")
        mask = torch.ones_like(logprobs) if mask is None else mask[:, 1:].to(logprobs.dtype)
        return -(logprobs * mask).sum(), mask.sum()

    return loss_fn


def train_step(learner: Learner, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> dict[str, float]:
    """Forward/backward over this DP rank's micro-batches, grad sync, clip, optimizer and LR step.

    Extra metrics the loss function sums (e.g. clipped tokens) come back divided by the global normaliser.
    """
    learner.model.train()
    learner.model.zero_grad_buffer()
    learner.optimizer.zero_grad()
    metric_names: list[str] = []

    def on_output(batch, logits_shard):
        summed, tokens, *extra = loss_fn(batch, logits_shard)
        extra = extra[0] if extra else {}
        metric_names[:] = sorted(extra)
        reported = torch.stack([summed.detach(), tokens.float(), *(extra[k].detach().float() for k in metric_names)])
        return summed, tokens.detach().to(torch.int), {"loss": reported}

    losses = run_schedule(learner.model, micro_batches, on_output, forward_only=False, pack=learner.pack_sequences)
    update_ok, grad_norm, _ = learner.optimizer.step()
    learner.scheduler.step(increment=1)
    learner.step += 1

    # Global sums for logging: over micro-batches here, then over DP; the last stage holds them, so broadcast
    # over PP (its first value says how many metrics follow, which only the last stage knows).
    last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    device = torch.cuda.current_device()  # NCCL reduces device tensors only (the CPU compat layer maps it to the CPU)
    count = torch.tensor([len(losses[0]["loss"]) if losses else 0], device=device)
    torch.distributed.broadcast(count, src=last_stage, group=pp_group)
    totals = torch.zeros(int(count), dtype=torch.float64, device=device)
    for item in losses:
        totals += item["loss"].double()
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.broadcast(totals, src=last_stage, group=pp_group)
    normaliser = totals[1].clamp(min=1)
    names = _broadcast_names(metric_names, last_stage, pp_group)
    return {
        "loss": (totals[0] / normaliser).item(),
        **{name: (totals[2 + i] / normaliser).item() for i, name in enumerate(names)},
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": learner.optimizer.param_groups[0]["lr"],
        "update_ok": bool(update_ok),
    }


def _broadcast_names(names: list[str], src: int, group) -> list[str]:
    holder = [names]
    torch.distributed.broadcast_object_list(holder, src=src, group=group)
    return holder[0]
