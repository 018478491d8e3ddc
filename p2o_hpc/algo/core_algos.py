"""GRPO's math as small named functions in registries (verl's ``core_algos`` pattern).

Advantage estimators map per-sequence rewards of prompt groups to per-sequence advantages; policy losses map
per-token log-probs to per-token losses; aggregators turn those into ``(summed_loss, normaliser)``, the pair
megatron's per-token loss mode sums over micro-batches and DP ranks before dividing.

Each registry is keyed by the values of its config enum (p2o_hpc.choices, verl's AdvantageEstimator beside its
registry): a new entry is a new enum member plus a function registered under it, and tests/test_config_schema.py
fails when the two differ, so every name the config accepts has a function and a typo never reaches a job.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Callable

import torch

from p2o_hpc.choices import Advantage, KLPenalty, LossAgg, PolicyLoss

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
KL_PENALTIES: dict[str, Callable] = {}
LOSS_AGGREGATIONS: dict[str, Callable] = {}


def _register(registry: dict[str, Callable], choice: type[StrEnum], name: str):
    """Register under `name`, which must be a value of the config enum `choice` (ValueError otherwise)."""
    key = choice(name).value

    def decorator(fn):
        if key in registry:
            raise ValueError(f"{key!r} is registered twice")
        registry[key] = fn
        return fn

    return decorator


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(registry)}")
    return registry[name]


def register_advantage(name: Advantage):
    return _register(ADVANTAGE_ESTIMATORS, Advantage, name)


def register_policy_loss(name: PolicyLoss):
    return _register(POLICY_LOSSES, PolicyLoss, name)


def register_kl(name: KLPenalty):
    return _register(KL_PENALTIES, KLPenalty, name)


def register_aggregation(name: LossAgg):
    return _register(LOSS_AGGREGATIONS, LossAgg, name)


def get_advantage_estimator(name: Advantage) -> Callable:
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_policy_loss(name: PolicyLoss) -> Callable:
    return _lookup(POLICY_LOSSES, "policy loss", name)


def get_kl_penalty(name: KLPenalty) -> Callable:
    return _lookup(KL_PENALTIES, "KL penalty", name)


def get_aggregation(name: LossAgg) -> Callable:
    return _lookup(LOSS_AGGREGATIONS, "loss aggregation", name)


# ----------------------------------------------------------------------------------------------- advantages


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sequence mean, unbiased std, and whether the sequence's group is constant (all rewards equal), on the
    rewards' device (host or GPU: whoever calls it need not move them)."""
    rewards = rewards.double()
    device = rewards.device
    _, inverse = torch.unique(group_ids, return_inverse=True)
    inverse = inverse.to(device)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(groups, dtype=torch.float64, device=device).index_add_(0, inverse, torch.ones_like(rewards))
    sums = torch.zeros(groups, dtype=torch.float64, device=device).index_add_(0, inverse, rewards)
    means = sums / counts
    squares = torch.zeros(groups, dtype=torch.float64, device=device).index_add_(0, inverse,
                                                                                 (rewards - means[inverse]) ** 2)
    # Bessel-corrected like torch.std (verl); a group of one has no spread.
    stds = torch.where(counts > 1, (squares / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(squares))
    lows = torch.full((groups,), float("inf"), dtype=torch.float64, device=device).scatter_reduce_(
        0, inverse, rewards, "amin")
    highs = torch.full((groups,), float("-inf"), dtype=torch.float64, device=device).scatter_reduce_(
        0, inverse, rewards, "amax")
    return means[inverse], stds[inverse], (lows == highs)[inverse]


@register_advantage(Advantage.grpo)
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(r − mean_group) / (std_group + eps); exactly 0 for constant groups (all-fail / all-pass: no signal)."""
    means, stds, constant = _group_stats(rewards, group_ids)
    advantages = (rewards.double() - means) / (stds + eps)
    return torch.where(constant, torch.zeros_like(advantages), advantages).float()


@register_advantage(Advantage.grpo_no_std)
def grpo_mean_centred_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """r − mean_group (Dr. GRPO): no division by the group std, so easy/hard groups are not up-weighted."""
    means, _, constant = _group_stats(rewards, group_ids)
    advantages = rewards.double() - means
    return torch.where(constant, torch.zeros_like(advantages), advantages).float()


# ---------------------------------------------------------------------------------------------- policy loss


@register_policy_loss(PolicyLoss.ppo_clip)
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate with asymmetric ratio bounds [1 − clip_low, 1 + clip_high].

    dual_clip_c (dual-clip PPO, Ye et al. 2020; verl's clip_ratio_c, the authors' 3.0): where A < 0 the loss is
    also capped at −A·c, so a token whose ratio has run far above 1 + clip_high stops pushing. The log-ratio is
    clamped to ±20 before exp, as verl does, so one wild token cannot overflow.
    Returns (per-token loss, per-token 0/1 "the clip was active") — the latter is the clip fraction's numerator.
    """
    if old_logprobs is None or advantages is None:
        raise ValueError("ppo_clip needs old_logprobs and advantages (an RL batch); supervised batches, which have "
                         "neither, train with algorithm.policy_loss=sft")
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip_c), loss)
    return loss, (clipped > unclipped).to(logprobs.dtype)


@register_policy_loss(PolicyLoss.sft)
def sft_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised fine-tuning: the per-token negative log-likelihood −log π_θ(y_t | x, y_<t).

    A policy loss by signature only, so SFT batches go through the same loss function, aggregation
    (algorithm.loss_agg over the response mask: prompt and padding never train) and megatron train step as RL.
    It is not an RL loss with advantages of 1: old log-probs, advantages and the clip settings are not inputs
    of it (an SFT batch has none; they may be None). Returns (per-token NLL, zeros: nothing is clipped).
    """
    return -logprobs, torch.zeros_like(logprobs)


# ---------------------------------------------------------------------------------------------------- KL


@register_kl(KLPenalty.low_var_kl)
def low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref): non-negative, unbiased, low variance (GRPO paper); clamped as verl."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


@register_kl(KLPenalty.k1)
def k1_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


# ------------------------------------------------------------------------------------------------ aggregation


@register_aggregation(LossAgg["token-mean"])
def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every response token of the global batch weighs the same (the paper's / DAPO's choice)."""
    return (per_token * mask).sum(), mask.sum()


@register_aggregation(LossAgg["seq-mean-token-mean"])
def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over tokens within a sequence, then over sequences (original GRPO): normaliser = #sequences."""
    lengths = mask.sum(dim=-1)
    present = lengths > 0
    per_sequence = (per_token * mask).sum(dim=-1) / lengths.clamp(min=1)
    return per_sequence[present].sum(), present.sum().to(per_token.dtype)
