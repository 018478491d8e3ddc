"""Forward passes through megatron's pipeline schedules, and per-token log-probs with vocab-parallel cross entropy.

Micro-batches are dicts with right-padded ``input_ids`` [batch, seq] (GPTModel's RoPE ignores position ids and
counts from 0, so left padding would shift positions). Results appear on the last pipeline stage only.

Packed (``pack=True``, parallel.pack_sequences): the model sees each micro-batch's sequences back to back as one
row with megatron's PackedSeqParams (THD; ``seq_lengths`` says where each ends), so no layer computes padding;
the last stage's logits are scattered back to the right-padded [batch, seq] layout, and everything downstream
(log-probs, losses, masks) is the same code for both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.utils import get_attr_wrapped_model


def mask_padded_vocab(logits_shard: torch.Tensor, vocab_size: int, *, inplace: bool = False) -> torch.Tensor:
    """Padded vocabulary rows (added so TP splits evenly) must get no probability mass."""
    shard_width = logits_shard.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard_width
    if start + shard_width <= vocab_size:
        return logits_shard
    keep = (torch.arange(start, start + shard_width) < vocab_size).to(logits_shard.device)
    fill = logits_shard.masked_fill_ if inplace else logits_shard.masked_fill
    return fill(~keep, float("-inf"))


def _whole_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # A fresh fp32 copy (also for fp32 logits): megatron's cross entropy and the vocab mask work on it in place.
    logits = logits_shard.to(torch.float32, copy=True).contiguous()
    return -vocab_parallel_cross_entropy(mask_padded_vocab(logits, vocab_size, inplace=True), targets.contiguous())


class _ChunkedLogprobs(torch.autograd.Function):
    """Log-probs over sequence chunks; backward recomputes each chunk's fp32 softmax and writes its gradient into
    one bf16 buffer. So between forward and backward only the (bf16) logits are kept, and at any time one chunk's
    fp32 copy exists instead of the whole [tokens, vocab/TP] one (16k tokens × 152k vocab: 10 GB at TP1; a
    1k-token chunk: 0.6 GB). torch.utils.checkpoint per slice would recompute the same way but add a full-size
    zero gradient per chunk (slice backward)."""

    @staticmethod
    def forward(ctx, logits_shard, targets, vocab_size, width):
        ctx.save_for_backward(logits_shard, targets)
        ctx.vocab_size, ctx.width = vocab_size, width
        seq = logits_shard.shape[1]
        return torch.cat([_whole_logprobs(logits_shard[:, start:start + width], targets[:, start:start + width],
                                          vocab_size) for start in range(0, seq, width)], dim=1)

    @staticmethod
    def backward(ctx, grad_output):
        logits_shard, targets = ctx.saved_tensors
        grad = torch.empty(logits_shard.shape, dtype=logits_shard.dtype, device=logits_shard.device)
        for start in range(0, logits_shard.shape[1], ctx.width):
            span = slice(start, start + ctx.width)
            with torch.enable_grad():
                piece = logits_shard[:, span].detach().requires_grad_()
                logprobs = _whole_logprobs(piece, targets[:, span], ctx.vocab_size)
                piece_grad = torch.autograd.grad(logprobs, piece, grad_output[:, span])[0]
            grad[:, span] = piece_grad
        return grad, None, None, None


def token_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   chunk_tokens: int = 0) -> torch.Tensor:
    """log p(target) per position from this TP rank's vocab shard of the logits (fp32; TP-collective).

    `chunk_tokens` (parallel.logprob_chunk_tokens; 0: all at once) bounds the fp32 working set to chunks of about
    that many tokens (whole positions of every row); the values are the same."""
    batch, seq = targets.shape
    width = max(1, chunk_tokens // max(1, batch))
    if chunk_tokens <= 0 or width >= seq:
        return _whole_logprobs(logits_shard, targets, vocab_size)
    return _ChunkedLogprobs.apply(logits_shard, targets, vocab_size, width)


def next_token_logprobs(logits_shard: torch.Tensor, input_ids: torch.Tensor, vocab_size: int,
                        chunk_tokens: int = 0) -> torch.Tensor:
    """[batch, seq-1]: log p(input_ids[:, t+1] | input_ids[:, :t+1])."""
    return token_logprobs(logits_shard[:, :-1], input_ids[:, 1:], vocab_size, chunk_tokens)


@dataclasses.dataclass
class PackedBatch:
    """A right-padded micro-batch's sequences back to back: `input_ids` [1, tokens] and the PackedSeqParams
    (THD) that keep attention and RoPE within each sequence; `unpack` scatters per-token outputs back."""

    input_ids: torch.Tensor
    params: PackedSeqParams
    rows: torch.Tensor
    columns: torch.Tensor
    shape: tuple[int, int]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, tokens, ...] -> [batch, seq, ...], zeros where the padded layout has padding."""
        values = packed[0, : self.rows.numel()]
        padded = values.new_zeros((*self.shape, *values.shape[1:]))
        return padded.index_put((self.rows, self.columns), values)


def pack_micro_batch(input_ids: torch.Tensor, seq_lengths: torch.Tensor, multiple: int = 1) -> PackedBatch:
    """`multiple`: the packed length is rounded up to it (sequence parallelism splits tokens evenly over the TP
    ranks); the extra tokens extend the last sequence, after every real token, so causal attention ignores them."""
    lengths = seq_lengths.tolist()
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), seq_lengths)
    columns = torch.cat([torch.arange(length, device=input_ids.device) for length in lengths])
    tokens = input_ids[rows, columns]
    extra = -len(tokens) % multiple
    if extra:
        tokens = torch.cat([tokens, tokens.new_zeros(extra)])
        lengths = [*lengths[:-1], lengths[-1] + extra]
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(input_ids.device)
    longest = max(lengths)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    return PackedBatch(tokens[None], params, rows, columns, tuple(input_ids.shape))


def run_schedule(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    on_output: Callable[[dict[str, torch.Tensor], torch.Tensor], tuple],
    *,
    forward_only: bool,
    pack: bool = False,
) -> list:
    """Drive megatron's schedule (no-pipelining, 1F1B, interleaved: megatron picks) over the micro-batches, whose
    tensors are on torch.cuda.current_device() (moved once where they are built, not here per pass).

    `on_output(batch, logits_shard)` runs on the last stage and returns what megatron's loss function returns:
    `(loss, reported)` or `(summed_loss, num_tokens, reported)`. Returns the `reported` items (last stage only).
    `pack`: THD sequence packing (the module docstring) by each micro-batch's `seq_lengths` (absent: whole rows).
    """
    models = model if isinstance(model, list) else [model]

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        if not pack:
            logits = module(batch["input_ids"], None, None)
        else:
            sp = get_attr_wrapped_model(module, "config").sequence_parallel
            input_ids = batch["input_ids"]
            lengths = batch.get("seq_lengths")
            if lengths is None:  # no lengths: every row is whole
                lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
            packed = pack_micro_batch(input_ids, lengths,
                                      parallel_state.get_tensor_model_parallel_world_size() if sp else 1)
            logits = module(packed.input_ids, None, None, packed_seq_params=packed.params)
            if get_attr_wrapped_model(module, "post_process"):
                logits = packed.unpack(logits)
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
    *,
    pack: bool = False,
) -> list[dict]:
    """Run the forward schedule (no grad) over all micro-batches; `collect(batch, logits_shard)` on the last stage
    (`pack`: as run_schedule).

    Returns one dict per micro-batch on the last pipeline stage, an empty list on the others.
    """
    for module in model if isinstance(model, list) else [model]:
        module.eval()
    with torch.no_grad():
        results = run_schedule(
            model, micro_batches, lambda batch, output: (torch.zeros(()), collect(batch, output)), forward_only=True,
            pack=pack,
        )
    return results if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else []
