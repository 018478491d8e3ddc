"""The GEPA service: one process (a SLURM job on a cluster) per run, beside the learner.

    python -m p2o_hpc.gepa.service --run-dir RUN_DIR

For each epoch t it waits for ``epochs/<t>/READY`` (the learner has written ``hard_set.jsonl`` and the policy as
a Hugging Face folder ``policy/``), loads that policy into its own vLLM engine, evolves templates with GEPA
(reflection by the reference model behind a local server, or a teacher endpoint) and publishes
``epochs/<t>/templates.json`` then ``DONE``. It ends when the learner writes ``FINISHED``. A lease file keeps it
to one instance per run; a restarted service resumes each round from its saved state.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console

from p2o_hpc.config import to_run_config
from p2o_hpc.lease import Lease, LeaseHeld
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.p2o.templates import templates_done
from p2o_hpc.trainer.hard_mining import epoch_dir

LEASE_FILE = "gepa_service.lease"
FAILED_FILE = "gepa_service.failed"


def ready(run_dir: Path, epoch: int) -> bool:
    return (epoch_dir(run_dir, epoch) / "READY").exists()


def finished(run_dir: Path) -> bool:
    return (run_dir / "FINISHED").exists()


def serve(run_dir: Path, console: Console, *, max_rounds: int | None = None) -> int:
    """Process epochs until the learner finishes (or `max_rounds` rounds ran); returns the rounds run."""
    from p2o_hpc.gepa.runner import Reflection, configured_round
    from p2o_hpc.launch import resolve_model_dir
    from p2o_hpc.rollout.rollout_worker import RolloutWorker

    cfg = to_run_config(OmegaConf.load(run_dir / "config.yaml"))
    reflection = None
    epoch = rounds = 0
    try:
        while max_rounds is None or rounds < max_rounds:
            if templates_done(run_dir, epoch):
                epoch += 1
                continue
            if not ready(run_dir, epoch):
                if finished(run_dir):
                    break
                time.sleep(cfg.gepa.poll_s)
                continue
            if reflection is None:
                reflection = Reflection(cfg.reflection, resolve_model_dir(cfg.model.path), run_dir / "logs")
            console.print(f"GEPA: epoch {epoch}: evolving templates for {epoch_dir(run_dir, epoch) / 'hard_set.jsonl'}")
            worker = RolloutWorker.from_config(cfg, str(epoch_dir(run_dir, epoch) / "policy"),
                                               max_response_tokens=cfg.gepa.max_response_tokens,
                                               enable_sleep_mode=False)
            try:
                metrics = configured_round(cfg, run_dir, epoch, worker, reflection)
            finally:
                worker.close()
            console.print(f"GEPA: epoch {epoch} done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            epoch += 1
            rounds += 1
    finally:
        if reflection is not None:
            reflection.close()
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the learner's run dir (holds config.yaml)")
    parser.add_argument("--max-rounds", type=int, default=None, help="stop after this many GEPA rounds")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    console = Console(stderr=True)
    # SIGTERM (scancel, the launcher) unwinds normally, so the engine and the reference server are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (run_dir / "config.yaml").is_file():
        console.print(f"[red]error:[/red] {run_dir / 'config.yaml'}: no such file (not a run dir?)")
        return 2
    try:
        with Lease(run_dir / LEASE_FILE, role="GEPA service"):
            (run_dir / FAILED_FILE).unlink(missing_ok=True)
            try:
                serve(run_dir, console, max_rounds=args.max_rounds)
            except Exception as error:
                # The learner polls for this file, so it stops with the cause instead of waiting for templates.
                atomic_write_text(run_dir / FAILED_FILE, f"{type(error).__name__}: {error}\n")
                raise
    except LeaseHeld as error:
        console.print(f"[red]error:[/red] {error}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
