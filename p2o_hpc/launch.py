"""Main entry point, a Hydra app: ``python -m p2o_hpc.launch [experiment=smoke] [parallel=tp2] [key=value …]``.

Composes the config (conf/), resolves the model, writes the resolved config into the run dir, starts the
learner ranks (local processes; SLURM jobs via the launcher issue) and ends with one line ``run_dir=<path>``
that scripts grep for. Re-running with the same ``hydra.run.dir`` resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from p2o_hpc.config import RunConfig, register_configs, to_run_config, validate
from p2o_hpc.io_utils import atomic_write_text


def resolve_model_dir(path: str) -> str:
    """"tiny" → the project's tiny Qwen3; a folder → itself; anything else is a hub name, downloaded once."""
    if path == "tiny":
        from p2o_hpc.tiny_model import build_tiny_model

        return str(build_tiny_model())
    if Path(path).is_dir():
        return str(Path(path).resolve())
    if Path(path).is_absolute() or path.startswith("."):
        raise FileNotFoundError(f"model.path={path!r}: no such folder")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Train in local processes (tensor × pipeline × data of them); returns the run dir."""
    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.trainer.grpo_trainer import run_worker

    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(cfg.model.path)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    world_size = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
    launch_local(run_worker, world_size, asdict(cfg), str(run_dir), model_dir)
    return run_dir


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cfg = to_run_config(cfg)
    run_dir = Path(run_cfg.run_dir or HydraConfig.get().runtime.output_dir).resolve()
    run(run_cfg, run_dir)
    print(f"run_dir={run_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
