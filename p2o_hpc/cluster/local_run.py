"""A run on this machine (cluster=local): the learner ranks as local processes, the GEPA service beside them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

from p2o_hpc.config import RunConfig
from p2o_hpc.run_dir import RunDir


def run_local(cfg: RunConfig, run_dir: RunDir, model_dir: str) -> None:
    """tensor × pipeline × data learner processes; for gepa.mode=service the GEPA service as its own process."""
    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.trainer.driver import run_worker

    service = start_gepa_service(run_dir) if cfg.algorithm.p2o.enabled and cfg.gepa.mode == "service" else None
    try:
        launch_local(run_worker, cfg.parallel.world_size, asdict(cfg), str(run_dir.path), model_dir)
    finally:
        if service is not None:
            stop_gepa_service(service, run_dir)


def start_gepa_service(run_dir: RunDir) -> subprocess.Popen:
    """The GEPA service as its own process beside the local learner (on SLURM: its own job)."""
    log = run_dir.logs / "gepa_service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "p2o_hpc.gepa.service", "--run-dir", str(run_dir.path)],
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_gepa_service(service: subprocess.Popen, run_dir: RunDir, grace_s: float = 120.0) -> None:
    """After the learner: the service ends by itself on FINISHED; after a learner failure it is stopped."""
    if not run_dir.finished():
        service.terminate()
    try:
        service.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()
