"""Forward passes through megatron's pipeline schedules, and per-token log-probs with vocab-parallel cross entropy.

Micro-batches are dicts with right-padded ``input_ids`` [batch, seq] (GPTModel's RoPE ignores position ids and
counts from 0, so left padding would shift positions). Results appear on the last pipeline stage only.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def mask_padded_vocab(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded vocabulary rows (added so TP splits evenly) must get no probability mass."""
    shard_width = logits_shard.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard_width
    if start + shard_width <= vocab_size:
        return logits_shard
    keep = (torch.arange(start, start + shard_width) < vocab_size).to(logits_shard.device)
    return logits_shard.masked_fill(~keep, float("-inf"))


def token_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) per position from this TP rank's vocab shard of the logits (fp32; TP-collective)."""
    logits = mask_padded_vocab(logits_shard.float(), vocab_size)
    return -vocab_parallel_cross_entropy(logits.contiguous(), targets.contiguous())


def next_token_logprobs(logits_shard: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, seq-1]: log p(input_ids[:, t+1] | input_ids[:, :t+1])."""
    return token_logprobs(logits_shard[:, :-1], input_ids[:, 1:], vocab_size)


def run_schedule(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    on_output: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple],
    *,
    forward_only: bool,
) -> list:
    """Drive megatron's schedule (no-pipelining, 1F1B, interleaved: megatron picks) over the micro-batches.

    `on_output(batch, logits_shard)` runs on the last stage and returns what megatron's loss function returns:
    `(loss, reported)` or `(summed_loss, num_tokens, reported)`. Returns the `reported` items (last stage only).
    """
    models = model if isinstance(model, list) else [model]

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        logits = module(batch["input_ids"], None, None)
        return logits, lambda output, batch=batch: on_output(batch, output)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=models,
        num_microbatches=len(micro_batches),
        seq_length=max(batch["input_ids"].shape[1] for batch in micro_batches),
        micro_batch_size=micro_batches[0]["input_ids"].shape[0],
        forward_only=forward_only,
    )


def forward_collect(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    collect: Callable[[dict[str, torch.Tensor], torch.Tensor], dict],
) -> list[dict]:
    """Run the forward schedule (no grad) over all micro-batches; `collect(batch, logits_shard)` on the last stage.

    Returns one dict per micro-batch on the last pipeline stage, an empty list on the others.
    """
    for module in model if isinstance(model, list) else [model]:
        module.eval()
    with torch.no_grad():
        results = run_schedule(
            model, micro_batches, lambda batch, output: (torch.zeros(()), collect(batch, output)), forward_only=True
        )
    return results if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else []
