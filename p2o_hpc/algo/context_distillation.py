"""Context distillation (P²O): a rollout generated on the templated prompt x̃ = T(x, z) trains on the original x.

The PPO ratio and the gradient use log π(y|x), so what the template taught lands in the weights for x itself.
Tokens that are far likelier under one prompt than the other are poor targets for the transfer; the authors'
released configuration therefore also computes log π(y|x̃) and drops tokens whose ratio π(y|x)/π(y|x̃) falls
outside [1 − low, 1 + high] (scripts: low 0.99, high 9 → [0.01, 10]). "soft" scales such a token down to the
bound instead of zeroing it; "none" keeps every token.
"""

from __future__ import annotations

import torch

from p2o_hpc.algo.rollout_batch import response_slice
from p2o_hpc.records import Rollout

CD_MASK_MODES = ("hard", "soft", "none")
BOUND_RTOL = 1e-6


def cd_token_weights(
    logprobs_plain: torch.Tensor, logprobs_templated: torch.Tensor, *, low: float, high: float, mode: str = "hard"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss weights and ratios π(y|x)/π(y|x̃) for the same response tokens (same shape in and out).

    hard: 1 inside [1 − low, 1 + high] (bounds included), else 0. soft: clamp(ratio)/ratio, i.e. the token
    counts as if its ratio sat on the bound it crossed. none: all 1.
    """
    if mode not in CD_MASK_MODES:
        raise ValueError(f"algorithm.cd.mask={mode!r}: expected one of {CD_MASK_MODES}")
    ratio = torch.exp((logprobs_plain.double() - logprobs_templated.double()).clamp(-50, 50))
    lower, upper = 1.0 - low, 1.0 + high
    if mode == "hard":
        # Bounds included up to fp32 rounding of the log-probs the ratio comes from.
        weights = ((ratio >= lower * (1 - BOUND_RTOL)) & (ratio <= upper * (1 + BOUND_RTOL))).double()
    elif mode == "soft":
        weights = ratio.clamp(lower, upper) / ratio
    else:
        weights = torch.ones_like(ratio)
    return weights.to(logprobs_plain.dtype), ratio.to(logprobs_plain.dtype)


def micro_batch_cd_weights(rollouts: list[Rollout], micro_batch: dict, templated_logprobs: torch.Tensor, *,
                           low: float, high: float, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss weights of one micro-batch (`cd_weight`, shaped like its `old_logprobs`: 1 except on distilled
    response tokens) and, flat, the distilled tokens' ratios and weights.

    `micro_batch["old_logprobs"]` holds log π(y|x) on the original prompts; `templated_logprobs` the same rows'
    log π(y|x̃) on the prompts the generator saw (rollout_batch.generation_micro_batch), each response at its own
    offset (response_slice).
    """
    plain_logprobs = micro_batch["old_logprobs"]
    weights = torch.ones_like(plain_logprobs)
    ratios, kept = [], []
    for row, index in enumerate(micro_batch["rollout_index"].tolist()):
        rollout = rollouts[index]
        if not rollout.distilled:
            continue
        plain, seen = response_slice(rollout), response_slice(rollout, generation=True)
        weight, ratio = cd_token_weights(plain_logprobs[row, plain], templated_logprobs[row, seen],
                                         low=low, high=high, mode=mode)
        weights[row, plain] = weight
        ratios.append(ratio)
        kept.append(weight)
    empty = plain_logprobs.new_zeros(0)
    return weights, torch.cat(ratios) if ratios else empty, torch.cat(kept) if kept else empty
