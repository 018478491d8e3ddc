"""Reflection LLM access for GEPA: the reference model behind a local `vllm serve` (`self`), or a teacher
behind any OpenAI-compatible endpoint (`teacher`); `none` runs plain GRPO without reflection."""

from p2o_hpc.config import ReflectionConfig, ReflectionKind
from p2o_hpc.reflection.client import ReflectionClient, ReflectionError
from p2o_hpc.reflection.server import ReferenceServer, ReferenceServerError

__all__ = [
    "ReferenceServer",
    "ReferenceServerError",
    "ReflectionClient",
    "ReflectionConfig",
    "ReflectionError",
    "ReflectionKind",
]
