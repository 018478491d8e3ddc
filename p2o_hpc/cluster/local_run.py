"""A run on this machine (cluster=local): the learner ranks as local processes, the GEPA service beside them.

The service is supervised like a SLURM service job (p2o_hpc.cluster.runs.poll_slurm): one that dies while the
learner runs (not after FINISHED, not after writing its failure file) is restarted up to gepa.max_restarts
times, and it is told this launcher's pid, so it stops when the launcher is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import asdict

from rich.console import Console

from p2o_hpc.config import RunConfig
from p2o_hpc.run_dir import RunDir


def run_local(cfg: RunConfig, run_dir: RunDir, model_dir: str) -> None:
    """tensor × pipeline × data learner processes; for gepa.mode=service the GEPA service as its own process."""
    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.trainer.driver import run_worker

    service = None
    if cfg.algorithm.p2o.enabled and cfg.gepa.mode == "service":
        service = LocalServiceSupervisor(run_dir, max_restarts=cfg.gepa.max_restarts, poll_s=cfg.gepa.poll_s)
    try:
        launch_local(run_worker, cfg.parallel.world_size, asdict(cfg), str(run_dir.path), model_dir)
    finally:
        if service is not None:
            service.stop()


def start_gepa_service(run_dir: RunDir) -> subprocess.Popen:
    """The GEPA service as its own process beside the local learner (on SLURM: its own job)."""
    log = run_dir.logs / "gepa_service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "p2o_hpc.gepa.service", "--run-dir", str(run_dir.path),
                                 "--parent-pid", str(os.getpid())],
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


class LocalServiceSupervisor:
    """The local GEPA service process, restarted when it dies while the learner runs (a watcher thread)."""

    def __init__(self, run_dir: RunDir, *, max_restarts: int, poll_s: float, console: Console | None = None):
        self.run_dir, self.max_restarts, self.poll_s = run_dir, max_restarts, poll_s
        self.console = console or Console(stderr=True)
        self.restarts = 0
        self.process = start_gepa_service(run_dir)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gepa-service-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                code = self.process.poll()
                if code is None or code == 0:
                    continue  # running, or ended by itself on FINISHED
                if self.run_dir.service_ended_on_purpose() or code in (2, 3) or self.restarts >= self.max_restarts:
                    return  # its failure stops the learner; 2: not a run dir, 3: another live service holds the lease
                self.restarts += 1
                self.console.print(f"[yellow]GEPA service (pid {self.process.pid}) ended with status {code} while "
                                   f"the learner runs: restart {self.restarts}/{self.max_restarts}[/yellow]")
                self.process = start_gepa_service(self.run_dir)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            stop_gepa_service(self.process, self.run_dir)
        self._thread.join(timeout=5)
