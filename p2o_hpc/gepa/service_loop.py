"""The GEPA service's loop: one process (a SLURM job on a cluster) per run, beside the learner.

For each epoch t it waits for the learner's READY (hard set + exported policy), loads that policy into its own
vLLM engine, evolves templates with GEPA (reflection by the reference model behind a local server, or a teacher
endpoint; reflection=edit: offline phrase edits, no model) and publishes the epoch's templates then DONE; it ends on the learner's FINISHED. The run dir's
service lease keeps it to one instance per run; a restarted service resumes each round from its saved state.
The files and their order are RunDir's protocol (p2o_hpc.run_dir). Started by a local launcher, it is given
the launcher's pid and stops when that process is gone (a killed launcher leaves no service behind); on SLURM
the launcher's supervision cancels it.
"""

from __future__ import annotations

import time

from rich.console import Console

from p2o_hpc.lease import LeaseHeld, terminate_when_gone
from p2o_hpc.run_dir import RunDir


def run_service(run_dir: RunDir, console: Console, *, max_rounds: int | None = None,
                parent_pid: int | None = None) -> int:
    """The service under its lease; an error is also written as the run's service failure, so the learner stops
    with that cause instead of waiting for templates. `parent_pid`: stop (as on SIGTERM) when that process (a local
    launcher) is gone. Exit status: 0 ok, 2 no config.yaml, 3 the lease is held."""
    if not run_dir.config.is_file():
        console.print(f"[red]error:[/red] {run_dir.config}: no such file (not a run dir?)")
        return 2
    if parent_pid is not None:
        terminate_when_gone(parent_pid, on_gone=lambda: console.print(
            f"GEPA service: the launcher (pid {parent_pid}) is gone: stopping"))
    try:
        with run_dir.service_lease():
            run_dir.clear_service_failed()
            try:
                serve(run_dir, console, max_rounds=max_rounds)
            except Exception as error:
                run_dir.mark_service_failed(f"{type(error).__name__}: {error}")
                raise
    except LeaseHeld as error:
        console.print(f"[red]error:[/red] {error}")
        return 3
    return 0


def serve(run_dir: RunDir, console: Console, *, max_rounds: int | None = None) -> int:
    """Process epochs until the learner finishes (or `max_rounds` rounds ran); returns the rounds run."""
    from p2o_hpc.gepa.runner import Reflection, configured_round
    from p2o_hpc.rollout.rollout_worker import RolloutWorker

    cfg = run_dir.load_config()
    reflection = None
    epoch = rounds = 0
    try:
        while max_rounds is None or rounds < max_rounds:
            if run_dir.done(epoch) or run_dir.skipped(epoch):  # published, or given up by the learner
                epoch += 1
                continue
            if not run_dir.ready(epoch):
                if run_dir.finished():
                    break
                time.sleep(cfg.gepa.poll_s)
                continue
            if reflection is None:
                reflection = Reflection.for_run(cfg, run_dir.logs)
            console.print(f"GEPA: epoch {epoch}: evolving templates for {run_dir.hard_set(epoch)}")
            worker = RolloutWorker.from_config(cfg, str(run_dir.policy(epoch)),
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
