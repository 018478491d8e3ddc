"""The eval app's structured config (`python -m p2o_hpc.eval`), registered in Hydra's ConfigStore as `eval_schema`.

Defaults are the paper's protocol (the Qwen2.5-Math suite): the six Table-1 benchmarks, avg@16 at T = 0.6 below
100 problems, greedy above, the training prompt. `cluster` is the main config's own group and dataclass
(conf/cluster/*.yaml, p2o_hpc.config.ClusterConfig), so a site preset serves both apps. No key is named like a
config group of conf/ (model, data, …): `model=x` would select a group file instead of setting a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from p2o_hpc.config import ClusterConfig
from p2o_hpc.evaluation.benchmarks import BENCHMARKS


class PromptStyle(StrEnum):
    # The training prompt: the run's data.template + data.chat_template_kwargs (a bare HF folder: the paper's).
    training = auto()
    # The suite's Qwen prompt: system "Please reason step by step, and put your final answer within \boxed{}.",
    # the problem as the user turn (chat_template_kwargs as for training: Qwen3 non-thinking).
    qwen_math = auto()


class DataSource(StrEnum):
    auto = "auto"  # the local copy under P2O_SHARED_DATA when it is there, else the hub
    local = "local"
    hub = "hub"


@dataclass
class EvalJobConfig:
    """The SLURM job of cluster=slurm (partition, account, setup, … come from cluster.*)."""

    gpus: int = 1  # also vLLM's tensor_parallel_size
    cpus_per_task: Optional[int] = None  # null → cluster.cpus_per_task
    mem_gb: Optional[int] = None  # null → cluster.mem_gb
    time_min: Optional[int] = None  # null → cluster.time_min; a requeued job resumes from the records


@dataclass
class EvalConfig:
    # What to evaluate: one spec or a list, each "path" or "label=path" (quote it: models='["base=/m/Qwen3-4B"]').
    # A path is an HF folder, a hub name, tiny / testbed, a run dir (its latest complete checkpoint, or every one
    # with all_checkpoints) or a run's checkpoints/step_N (both converted to HF first). Typed loosely so that
    # `-m models=a,b` sweeps one model per point.
    models: Any = field(default_factory=list)
    all_checkpoints: bool = False
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    limit: Optional[int] = None  # the first N problems of each benchmark (CI); the protocol keeps the full size's
    data_source: DataSource = DataSource.auto
    prompt: PromptStyle = PromptStyle.training
    # Protocol: benchmarks with fewer than sample_below problems → n_samples at temperature/top_p, else greedy.
    sample_below: int = 100
    n_samples: int = 16
    temperature: float = 0.6
    top_p: float = 1.0  # the suite's default (math_eval.py --top_p 1) and the training rollouts'
    max_tokens: int = 12288  # new tokens per response: the paper's rollout budget (the suite's default is 2048)
    seed: int = 0
    # Grading: a p2o_hpc.reward registry name; deepscaler = math-verify on the last \boxed{} (the box the suite
    # extracts) plus the suite's %-insensitivity.
    reward: str = "deepscaler"
    reward_workers: int = 2
    reward_timeout_s: float = 10.0
    # Engine (one per model, reused across the benchmarks).
    dtype: str = "auto"  # vLLM's; auto → the checkpoint's
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: Optional[int] = None  # null → job.gpus on SLURM, else 1
    batch_problems: int = 64  # problems per engine call; a killed eval regenerates at most this many
    output_dir: str = "eval_results"  # one folder per model label, the table beside them
    progress: bool = True
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    job: EvalJobConfig = field(default_factory=EvalJobConfig)


def register_eval_configs() -> None:
    """conf/eval.yaml starts its defaults list with `eval_schema`."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def to_eval_config(cfg: DictConfig | dict) -> EvalConfig:
    """A typed EvalConfig from Hydra's DictConfig (or a plain dict: the SLURM job's copy)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg))


def model_specs(cfg: EvalConfig) -> list[str]:
    """cfg.models as a list of non-empty strings (one spec or a list), or a ValueError naming `models`."""
    specs = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models or [])
    if not specs:
        raise ValueError("models is empty: give models=/path/to/hf_folder (or a run dir, checkpoints/step_N, tiny, "
                         "a hub name), several as models='[a,\"label=b\"]'")
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"models: {spec!r} is not a model path (a string, optionally label=path)")
    return [str(spec).strip() for spec in specs]


def validate_eval(cfg: EvalConfig) -> None:
    """Ranges the types cannot say, named by their key."""
    checks = (
        (cfg.limit is None or cfg.limit >= 1, f"limit={cfg.limit} must be ≥ 1 (or null: every problem)"),
        (cfg.n_samples >= 1, f"n_samples={cfg.n_samples} must be ≥ 1"),
        (cfg.temperature > 0 or cfg.n_samples == 1,
         f"n_samples={cfg.n_samples} needs temperature > 0 (greedy samples are all the same)"),
        (0 < cfg.top_p <= 1, f"top_p={cfg.top_p} must be in (0, 1]"),
        (cfg.max_tokens >= 1, f"max_tokens={cfg.max_tokens} must be ≥ 1"),
        (cfg.batch_problems >= 1, f"batch_problems={cfg.batch_problems} must be ≥ 1"),
        (cfg.reward_workers >= 1, f"reward_workers={cfg.reward_workers} must be ≥ 1"),
        (bool(cfg.benchmarks), "benchmarks is empty"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
