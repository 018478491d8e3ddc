"""Structured config for the reflection LLM that GEPA asks for improved prompt templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

REFLECTION_KINDS = ("self", "teacher", "none")
TEACHER_CONTEXT_TOKENS = 32768  # the authors' reflection_max_model_length, also for their API teacher


@dataclass
class ReflectionConfig:
    # self: the reference model (original weights) behind a local `vllm serve` that GEPA starts and stops;
    # teacher: any OpenAI-compatible endpoint; none: no reflection (plain GRPO).
    kind: str = "self"
    base_url: Optional[str] = None  # teacher only; `self` takes the local server's URL
    model: Optional[str] = None  # teacher: the endpoint's model name; self: the served name (None → "reference")
    # NAME of the environment variable holding the key; the key itself never enters configs, logs or files.
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    max_concurrency: int = 8  # simultaneous requests per client
    timeout_s: float = 300.0  # per HTTP attempt
    max_retries: int = 5  # extra attempts after the first, on 408/429/5xx and connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0  # also caps a server's Retry-After
    # The authors' reflection sampling: reflection_temperature null → rollout temperature 0.6, 2048 new tokens.
    temperature: float = 0.6
    max_tokens: int = 2048
    # Sent as the request body's `chat_template_kwargs` (vLLM renders the chat template with them); {} sends none.
    # self: ${data.chat_template_kwargs}, the policy's non-thinking mode; teacher: {} (a strict API may refuse the
    # field).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The reflection model's context in tokens: the reflection prompt is fitted into context_tokens − max_tokens
    # (the minibatch's responses cut by the authors' rule, counted with the policy's tokenizer).
    # null → serve_max_model_len for self (the server's real limit), 32768 for a teacher (the authors' value).
    context_tokens: Optional[int] = None
    price_per_million_input: float = 0.0  # USD, for the cost tally only
    price_per_million_output: float = 0.0
    # kind=self only:
    serve_port: Optional[int] = None  # None → pick a free port on 127.0.0.1
    serve_start_timeout_s: float = 600.0
    serve_max_model_len: int = 32768  # the authors' reference server (my_scripts/start_vllm_server.sh)
    serve_extra_args: list[str] = field(default_factory=list)  # appended to the `vllm serve` command line


def reflection_context_tokens(cfg) -> int:
    """The context the reflection prompt and its answer share (see ReflectionConfig.context_tokens)."""
    if cfg.context_tokens is not None:
        return int(cfg.context_tokens)
    return int(cfg.serve_max_model_len) if cfg.kind == "self" else TEACHER_CONTEXT_TOKENS


def reflection_prompt_budget(cfg) -> int:
    """Tokens the reflection prompt may take: the context minus the answer's max_tokens (the authors' budget)."""
    return reflection_context_tokens(cfg) - int(cfg.max_tokens)
