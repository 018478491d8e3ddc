"""From completed rollouts to this rank's training micro-batches.

Rollouts are ordered prompt-major (the K samples of prompt 0, then prompt 1, …). A step's prompts split into
mini-batches (one optimizer step each). A mini-batch's sequences go to the DP ranks and into micro-batches, each
right-padded to its own longest sequence (megatron runs with variable sequence lengths), in one of two ways:

- fixed size (algorithm.micro_batch_size): dealt round-robin, cut in rollout order;
- token budget (algorithm.micro_batch_tokens > 0, verl's use_dynamic_bsz): dealt longest first to the DP rank with
  the fewest tokens so far, then sorted by length and cut into micro-batches of at most that many padded tokens
  (rows × longest: the loss side works on this right-padded layout also when the learner packs the sequences,
  parallel.pack_sequences, so the budget bounds its memory either way). Similar lengths share a micro-batch.

Either way the loss is a sum over every token of the mini-batch divided by their global count (megatron's
per-token loss), so how sequences are grouped changes the speed, not the gradient.

Micro-batches are built on the host and moved once to `device`: the learner passes torch.cuda.current_device(),
where the model, its log-probs and the loss live (NCCL and the GPU kernels take device tensors only).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from p2o_hpc.records import Rollout

# Padding sits after each sequence's end and is masked out of the loss, so causal attention never lets it touch a
# trained position; any in-vocabulary id works.
PAD_ID = 0


def group_ids(rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([rollout.prompt_index for rollout in rollouts])


def rewards_tensor(rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([rollout.reward for rollout in rollouts], dtype=torch.float32)


def mini_batch_indices(num_prompts: int, n_samples: int, prompts_per_mini_batch: int) -> list[list[int]]:
    """Rollout indices of each mini-batch; whole groups stay together."""
    per_mini = prompts_per_mini_batch * n_samples
    total = num_prompts * n_samples
    return [list(range(start, min(start + per_mini, total))) for start in range(0, total, per_mini)]


def pack_by_length(lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into micro-batches of rows × longest ≤ micro_batch_tokens (a
    sequence longer than the budget gets its own)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= micro_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def balance_by_tokens(indices: Sequence[int], lengths: Mapping[int, int], parts: int) -> list[list[int]]:
    """`indices` dealt into `parts` lists of similar token sums: longest first, each to the part with the fewest
    tokens so far (ties: the lowest part). Deterministic, so every rank computes the same split."""
    dealt: list[list[int]] = [[] for _ in range(parts)]
    tokens = [0] * parts
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        part = min(range(parts), key=lambda p: (tokens[p], p))
        dealt[part].append(index)
        tokens[part] += lengths[index]
    return dealt


def padding_fraction(micro_batches: list[dict], *, packed: bool = False) -> float:
    """The share of the learner's token slots that hold padding: right-padded rows, or none when packed."""
    if packed:
        return 0.0
    slots = sum(batch["input_ids"].numel() for batch in micro_batches)
    real = sum(int(batch["seq_lengths"].sum()) for batch in micro_batches)
    return 1.0 - real / slots if slots else 0.0


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, longest] token ids padded after each sequence's end with `pad_id`, and the rows' lengths (host)."""
    input_ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
    return input_ids, torch.tensor([len(sequence) for sequence in sequences])


def collate(rollouts: list[Rollout], indices: list[int], advantages: torch.Tensor, pad_id: int,
            device=None) -> dict:
    """One right-padded micro-batch on `device` (None: the host). `rollout_index` maps rows back to the step's
    rollouts; `seq_lengths` are the rows' unpadded lengths (for packing them)."""
    input_ids, seq_lengths = right_padded([rollouts[i].sequence for i in indices], pad_id)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.float32)
    for row, i in enumerate(indices):
        rollout = rollouts[i]
        response_mask[row, len(rollout.prompt_ids):len(rollout.sequence)] = 1.0
    batch = {
        "input_ids": input_ids,
        "response_mask": response_mask,
        "advantages": advantages[indices].float(),
        "rollout_index": torch.tensor(indices),
        "seq_lengths": seq_lengths,
    }
    return batch if device is None else {key: value.to(device) for key, value in batch.items()}


def rank_micro_batches(
    rollouts: list[Rollout],
    advantages: torch.Tensor,
    mini_batch: list[int],
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    pad_id: int,
    micro_batch_tokens: int = 0,
    device=None,
) -> list[dict]:
    """This DP rank's micro-batches of one mini-batch on `device` (every TP/PP rank of the DP group builds the same
    ones): by token budget when `micro_batch_tokens` > 0, else of `micro_batch_size` sequences."""
    if micro_batch_tokens > 0:
        lengths = {i: len(rollouts[i].sequence) for i in mini_batch}
        mine = balance_by_tokens(mini_batch, lengths, dp_size)[dp_rank]
        groups = pack_by_length([lengths[i] for i in mine], micro_batch_tokens)
        return [collate(rollouts, [mine[j] for j in group], advantages, pad_id, device) for group in groups]
    mine = mini_batch[dp_rank::dp_size]
    if len(mine) % micro_batch_size:
        raise ValueError(
            f"{len(mine)} sequences on DP rank {dp_rank} do not split into micro-batches of {micro_batch_size}"
        )
    return [
        collate(rollouts, mine[start : start + micro_batch_size], advantages, pad_id, device)
        for start in range(0, len(mine), micro_batch_size)
    ]


def generation_micro_batch(rollouts: list[Rollout], batch: dict, pad_id: int) -> dict | None:
    """The same rows as `batch`, on the prompts the generator saw (for log π(y|x̃)), on `batch`'s device; None when
    none differs."""
    indices = batch["rollout_index"].tolist()
    if not any(rollouts[i].distilled for i in indices):
        return None
    input_ids, seq_lengths = right_padded([rollouts[i].generation_sequence for i in indices], pad_id)
    device = batch["input_ids"].device
    return {"input_ids": input_ids.to(device), "rollout_index": batch["rollout_index"],
            "seq_lengths": seq_lengths.to(device)}


def response_slice(rollout: Rollout, generation: bool = False) -> slice:
    """Where the response tokens' next-token log-probs sit in a row of [seq-1] log-probs."""
    prompt_len = len(rollout.generation_prompt_ids or rollout.prompt_ids) if generation else len(rollout.prompt_ids)
    return slice(prompt_len - 1, prompt_len - 1 + len(rollout.response_ids))
