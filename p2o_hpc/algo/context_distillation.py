"""Context distillation (P²O): a rollout generated on the templated prompt x̃ = T(x, z) trains on the original x.

The PPO ratio and the gradient use log π(y|x), so what the template taught lands in the weights for x itself.
Tokens that are far likelier under one prompt than the other are poor targets for the transfer; the authors'
released configuration therefore also computes log π(y|x̃) and drops tokens whose ratio π(y|x)/π(y|x̃) falls
outside [1 − low, 1 + high] (scripts: low 0.99, high 9 → [0.01, 10]). "soft" scales such a token down to the
bound instead of zeroing it; "none" keeps every token.
"""

from __future__ import annotations

import torch

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
