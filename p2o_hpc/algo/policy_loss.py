"""The GRPO loss as megatron computes it on the last pipeline stage: log-probs from the vocab-parallel logits,
then the registered policy loss, KL penalty and aggregation.

Micro-batch keys (all right-padded to the micro-batch's longest sequence):
  input_ids [b, s]; response_mask [b, s] (1 where the token is a response token, i.e. a training target);
  old_logprobs [b, s-1] (behaviour log-probs aligned with next-token positions); advantages [b]
  (both absent in supervised batches, which train with policy_loss=sft: input_ids and response_mask only);
  ref_logprobs [b, s-1] (only with a KL term);
  cd_weight [b, s-1] (P²O context distillation: per-token weights from the π(y|x)/π(y|x̃) ratio mask; absent = 1).

A CD-masked token multiplies its loss by its weight but stays in the token-mean's denominator, as in the authors'
loss (verl core_algos.compute_policy_loss: `pg_losses * template_ratio_mask`, then agg_loss over response_mask).
"""

from __future__ import annotations

import torch

from p2o_hpc.algo.core_algos import get_aggregation, get_kl_penalty, get_policy_loss
from p2o_hpc.config import AlgorithmConfig
from p2o_hpc.megatron.forward import next_token_logprobs


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[b, s-1]: next-token positions whose target is a response token (prompt and padding never train)."""
    return batch["response_mask"][:, 1:].float()


def make_policy_loss_fn(vocab_size: int, algo: AlgorithmConfig, *, logprob_chunk_tokens: int = 0):
    """A `training.LossFn` for algorithm.* (policy_loss, clip_low/high, dual_clip_c, loss_agg, kl_coef,
    kl_penalty): returns (summed loss, normaliser, summed metrics) for one micro-batch."""
    policy_loss = get_policy_loss(algo.policy_loss)
    aggregate = get_aggregation(algo.loss_agg)
    kl_penalty = get_kl_penalty(algo.kl_penalty) if algo.kl_coef > 0 else None

    def loss_fn(batch, logits_shard):
        logprobs = next_token_logprobs(logits_shard, batch["input_ids"], vocab_size, logprob_chunk_tokens)
        mask = target_mask(batch)
        advantages = batch.get("advantages")
        if advantages is not None:
            advantages = advantages.float()[:, None].expand_as(logprobs)
        per_token, clipped = policy_loss(
            logprobs, batch.get("old_logprobs"), advantages, clip_low=algo.clip_low, clip_high=algo.clip_high,
            dual_clip_c=algo.dual_clip_c,
        )
        if "cd_weight" in batch:
            per_token = per_token * batch["cd_weight"].float()
        metrics = {}
        if kl_penalty is not None:
            kl = kl_penalty(logprobs, batch["ref_logprobs"])
            per_token = per_token + algo.kl_coef * kl
            metrics["kl"] = aggregate(kl.detach(), mask)[0]
        summed, normaliser = aggregate(per_token, mask)
        metrics["clip_frac"] = aggregate(clipped, mask)[0]
        return summed, normaliser, metrics

    return loss_fn
