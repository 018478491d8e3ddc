"""Record types that cross layers: a problem, one rollout of it, and one training step's batch.

They live here, below every layer that passes them along (data → rollout → P²O → the training driver), so no
layer imports another one's module just for a type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Problem:
    """One math problem with its gold answer as text (AIME's "023" stays "023"; graders compare, not us)."""

    id: str
    problem: str
    answer: str
    source: str
    meta: dict = field(default_factory=dict)


@dataclass
class Rollout:
    prompt_index: int  # position of the prompt in the step's batch: the GRPO group
    prompt_ids: list[int]  # the prompt the learner trains on (P²O context distillation: the original x)
    response_ids: list[int]
    rollout_logprobs: list[float] | None  # the generator's own log-probs of response_ids
    finish_reason: str
    text: str
    reward: float = 0.0
    template: str = ""  # the P²O template the response was generated under ("" = the original prompt)
    generation_prompt_ids: list[int] | None = None  # what the generator saw, when that differs from prompt_ids

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def generation_sequence(self) -> list[int]:
        return (self.generation_prompt_ids or self.prompt_ids) + self.response_ids

    @property
    def distilled(self) -> bool:
        """Generated on a templated prompt but trained on another one: context distillation applies."""
        return self.generation_prompt_ids is not None and self.generation_prompt_ids != self.prompt_ids


@dataclass
class StepBatch:
    """One step's prompts and everything the step learns about them, in the order the driver fills it in."""

    problems: list[Problem]
    epoch: int  # the epoch these prompts belong to
    epoch_finished: bool  # the last batch of that epoch: mining and the P²O exchange run after this step
    gate_metrics: dict = field(default_factory=dict)  # the P²O schedule's numbers for this batch (overlap waits)
    rollouts: list[Rollout] = field(default_factory=list)  # prompt-major: the K samples of prompt 0, then 1, …
    generate_s: float = 0.0  # slowest engine host's generation time
    reward_s: float = 0.0
    templates_rejected: int = 0  # P²O templates refused by the checks (those rollouts used the plain prompt)
    advantages: Optional[torch.Tensor] = None  # one per rollout
