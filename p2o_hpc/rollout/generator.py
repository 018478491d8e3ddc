"""The generator interface: what the trainer asks of a rollout engine, whichever process it runs in.

Two implementations: `vllm_engine.VLLMGenerator` (vLLM in this process) and
`generator_process.GeneratorProcess` (the same engine in a spawned child, which the learner uses).

Logprobs are vLLM's `raw_logprobs` (set explicitly on the engine): log_softmax of the raw logits, i.e.
temperature 1 and no top-p, whatever the sampling temperature. That is the quantity the learner
recomputes for the same tokens, so the refit check compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from p2o_hpc.rollout.weight_sync import Bucket


@dataclass
class SamplingSettings:
    """Per-call sampling (paper defaults: T=0.6, top_p=1.0, n = K rollouts per prompt).

    seed: prompt i's k-th sample uses seed + i*n + k, so a call is reproducible while no two
    samples in it share a random stream (vLLM itself only offsets by k, so equal prompts in one
    batch would otherwise get equal samples).
    detokenize: off by default: the trainer decodes token ids itself, and detokenizing in vLLM costs
    CPU per token. When on, Completion.text holds vLLM's decoding.
    """

    n: int
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    logprobs: bool = True
    detokenize: bool = False


@dataclass
class Completion:
    """One sampled continuation. logprobs[t] is the raw log-probability of token_ids[t] (None if not asked).

    finish_reason: vLLM's, "stop" (EOS or a stop token) or "length" (max_tokens / max_model_len).
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    text: str = ""


class Generator(Protocol):
    """What the trainer calls on a rollout engine; GeneratorProcess forwards to its child by this list."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSettings) -> list[list[Completion]]:
        """Per prompt, sampling.n completions, in prompt order."""
        ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, entry t = log p(token t | tokens < t); entry 0 is nan (nothing to condition on)."""
        ...

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Replace all weights with the learner's HF-named buckets (full tensors; tied lm_head may be absent)."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class GeneratorError(RuntimeError):
    """An error raised inside the generator child, re-raised in the parent with the child's traceback."""

    def __init__(self, message: str, child_type: str = "", child_traceback: str = ""):
        super().__init__(message)
        self.child_type = child_type
        self.child_traceback = child_traceback


class GeneratorDied(RuntimeError):
    """The generator child exited (crash, OOM kill, signal) or cannot be reached."""
