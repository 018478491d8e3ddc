"""Main entry point, a Hydra app: ``python -m p2o_hpc.launch [experiment=smoke] [parallel=tp2] [key=value …]``.

Composes the config (conf/), resolves the model, writes the resolved config into the run dir, starts the
learner ranks (local processes; SLURM jobs via the launcher issue) and ends with one line ``run_dir=<path>``
that scripts grep for. Re-running with the same ``hydra.run.dir`` resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import subprocess
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
    (run_dir / "FINISHED").unlink(missing_ok=True)
    world_size = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
    service = start_gepa_service(run_dir) if cfg.algorithm.p2o.enabled and cfg.gepa.mode == "service" else None
    try:
        launch_local(run_worker, world_size, asdict(cfg), str(run_dir), model_dir)
    finally:
        if service is not None:
            stop_gepa_service(service, run_dir)
    return run_dir


def start_gepa_service(run_dir: Path) -> subprocess.Popen:
    """The GEPA service as its own process beside the local learner (on SLURM: its own job)."""
    log = run_dir / "logs" / "gepa_service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "p2o_hpc.gepa.service", "--run-dir", str(run_dir)],
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_gepa_service(service: subprocess.Popen, run_dir: Path, grace_s: float = 120.0) -> None:
    """After the learner: the service ends by itself on FINISHED; after a learner failure it is stopped."""
    if not (run_dir / "FINISHED").exists():
        service.terminate()
    try:
        service.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cfg = to_run_config(cfg)
    run_dir = Path(run_cfg.run_dir or HydraConfig.get().runtime.output_dir).resolve()
    run(run_cfg, run_dir)
    print(f"run_dir={run_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
