"""The GRPO loss as megatron computes it on the last pipeline stage: log-probs from the vocab-parallel logits,
then the registered policy loss, KL penalty and aggregation.

Micro-batch keys (all right-padded to the micro-batch's longest sequence):
  input_ids [b, s]; response_mask [b, s] (1 where the token is a response token, i.e. a training target);
  old_logprobs [b, s-1] (behaviour log-probs aligned with next-token positions); advantages [b];
  ref_logprobs [b, s-1] (only with a KL term);
  cd_weight [b, s-1] (P²O context distillation: per-token weights from the π(y|x)/π(y|x̃) ratio mask; absent = 1).

A CD-masked token multiplies its loss by its weight but stays in the token-mean's denominator, as in the authors'
loss (verl core_algos.compute_policy_loss: `pg_losses * template_ratio_mask`, then agg_loss over response_mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2o_hpc.algo.core_algos import get_aggregation, get_kl_penalty, get_policy_loss
from p2o_hpc.megatron.forward import next_token_logprobs


@dataclass(frozen=True)
class PolicyLossSettings:
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = None
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_penalty: str = "low_var_kl"


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[b, s-1]: next-token positions whose target is a response token (prompt and padding never train)."""
    return batch["response_mask"][:, 1:].float()


def make_policy_loss_fn(vocab_size: int, settings: PolicyLossSettings):
    """A `training.LossFn`: returns (summed loss, normaliser, summed metrics) for one micro-batch."""
    policy_loss = get_policy_loss(settings.policy_loss)
    aggregate = get_aggregation(settings.loss_agg)
    kl_penalty = get_kl_penalty(settings.kl_penalty) if settings.kl_coef > 0 else None

    def loss_fn(batch, logits_shard):
        logprobs = next_token_logprobs(logits_shard, batch["input_ids"], vocab_size)
        mask = target_mask(batch)
        advantages = batch["advantages"].float()[:, None].expand_as(logprobs)
        per_token, clipped = policy_loss(
            logprobs, batch["old_logprobs"], advantages, clip_low=settings.clip_low, clip_high=settings.clip_high,
            dual_clip_c=settings.dual_clip_c,
        )
        if "cd_weight" in batch:
            per_token = per_token * batch["cd_weight"].float()
        metrics = {}
        if kl_penalty is not None:
            kl = kl_penalty(logprobs, batch["ref_logprobs"])
            per_token = per_token + settings.kl_coef * kl
            metrics["kl"] = aggregate(kl.detach(), mask)[0]
        summed, normaliser = aggregate(per_token, mask)
        metrics["clip_frac"] = aggregate(clipped, mask)[0]
        return summed, normaliser, metrics

    return loss_fn
