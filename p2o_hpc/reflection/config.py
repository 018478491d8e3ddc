"""Structured config for the reflection LLM that GEPA asks for improved prompt templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

REFLECTION_KINDS = ("self", "teacher", "none")


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
    temperature: float = 1.0
    max_tokens: int = 2048
    price_per_million_input: float = 0.0  # USD, for the cost tally only
    price_per_million_output: float = 0.0
    # kind=self only:
    serve_port: Optional[int] = None  # None → pick a free port on 127.0.0.1
    serve_start_timeout_s: float = 600.0
    serve_max_model_len: int = 8192
    serve_extra_args: list[str] = field(default_factory=list)  # appended to the `vllm serve` command line
