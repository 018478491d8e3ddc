"""Runs as the launcher sees them: prepare a run dir, start the run (locally or as SLURM jobs), supervise it
(restart a dead GEPA service, cancel it when the learner ends) and summarise a set of runs in one table.

One run failing never stops its siblings: its state and error go into the summary, and the command exits non-zero.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.errors import CompactHydraException
from rich.console import Console
from rich.table import Table

from p2o_hpc.config import RunConfig
from p2o_hpc.data import DatasetError, TemplateError, training_problems, validate_template
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.report import read_metrics

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
SERVICE_GRACE_S = 60.0  # after the learner completed, the service gets this long to end by itself on FINISHED


@dataclass
class RunHandle:
    name: str
    run_dir: RunDir
    cfg: RunConfig
    learner: object = None  # submitit.Job (slurm)
    service: object = None
    service_jobs: list[str] = field(default_factory=list)  # every service job id, restarts included
    state: str = "PENDING"
    error: str = ""
    learner_ended_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL and (self.service is None or _state(self.service) in TERMINAL)


class RunRefused(CompactHydraException):
    """A config, model or data error found before anything was written or started: Hydra prints its message as
    is (one line), not a traceback that buries it."""


def preflight(cfg: RunConfig, model_dir: Optional[str] = None) -> None:
    """What the jobs would only find out on the cluster (or each rank after megatron's init), checked before
    anything is submitted: the teacher's endpoint and key (reflection=edit: its phrase bank), the prompt template,
    the model's shape against parallel.* (model_dir: the resolved model.path; None skips it) and, on GPUs, the
    learner's memory plan against parallel.gpu_memory_gb (a warning), and the training set (and validation.sets),
    read as the learner reads it. Cheap checks first; reading the data takes a second or two."""
    reflection = cfg.reflection
    uses_teacher = cfg.algorithm.p2o.enabled and cfg.gepa.mode != "off" and reflection.kind == "teacher"
    if uses_teacher and not reflection.base_url:
        raise ValueError(f"reflection=teacher (model {reflection.model}) has no endpoint: set $P2O_TEACHER_BASE_URL "
                         "or reflection.base_url to an OpenAI-compatible server that serves that model")
    if uses_teacher and reflection.api_key_env and not os.environ.get(reflection.api_key_env):
        raise ValueError(f"reflection=teacher ({reflection.base_url}, model {reflection.model}) reads its API key "
                         f"from ${reflection.api_key_env}, which is not set here (the jobs inherit this environment)")
    if cfg.algorithm.p2o.enabled and cfg.gepa.mode != "off" and reflection.kind == "edit":
        from p2o_hpc.gepa.edit_mutation import load_phrase_bank

        load_phrase_bank(reflection.edit_phrase_bank)  # a missing or empty bank fails here, not in the GEPA job
    try:
        validate_template(cfg.data.template)
    except TemplateError as error:
        raise ValueError(f"data.template: {error}") from error
    if model_dir is not None:
        check_model_shape(cfg, model_dir)
        from p2o_hpc.megatron.memory_plan import check_layout, memory_warning, read_model_shape

        shape = read_model_shape(model_dir)  # config.json only
        check_layout(shape, cfg)
        warning = memory_warning(shape, cfg) if cfg.cluster.gpus else None  # a CPU run has no GPU budget
        if warning:
            Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}")
    data = cfg.data.train
    if data.endswith((".json", ".jsonl")) and not Path(data).is_file():
        raise FileNotFoundError(f"data.train={data}: no such file")
    try:
        training_problems(cfg.data)
    except DatasetError as error:
        raise DatasetError(f"data.train={data}: {error}") from error
    if cfg.validation.sets:  # read as the learner reads them; the error names validation.sets.<name>
        from p2o_hpc.trainer.validation import load_validation_sets

        load_validation_sets(cfg)


def check_model_shape(cfg: RunConfig, model_dir: str) -> None:
    """Megatron splits the attention heads, the KV groups (whole groups per rank: megatron/weight_mapping.py) and
    the MLP over parallel.tensor, and the layers over parallel.pipeline; a model that does not divide would fail
    in every rank after init. Read from the model folder's config.json."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model.path={cfg.model.path}: {model_dir} has no config.json (not a Hugging Face "
                                "model folder)")
    config = json.loads(config_path.read_text())
    heads = config.get("num_attention_heads")
    splits = (("parallel.tensor", cfg.parallel.tensor,
               {"num_attention_heads": heads, "num_key_value_heads": config.get("num_key_value_heads") or heads,
                "intermediate_size": config.get("intermediate_size")}),
              ("parallel.pipeline", cfg.parallel.pipeline, {"num_hidden_layers": config.get("num_hidden_layers")}))
    for key, ranks, counts in splits:
        for name, value in counts.items():
            if isinstance(value, int) and value % ranks:
                raise ValueError(f"{key}={ranks} does not divide the model's {name}={value} (megatron splits it "
                                 f"evenly over the {key} ranks); model folder {model_dir} (model.path="
                                 f"{cfg.model.path})")


def prepare_run_dir(cfg: RunConfig, run_dir: RunDir, *, overrides: Optional[list[str]]) -> None:
    """The resolved config (what the jobs read) and the overrides that made it, before anything starts."""
    holder = run_dir.learner_lease().live_holder()
    if holder is not None:
        raise RuntimeError(f"{run_dir.path}: a learner is already writing this run dir (host {holder.get('host')}, "
                           f"pid {holder.get('pid')}); two jobs never share a run dir")
    run_dir.write_config(cfg, overrides)
    run_dir.clear_finished()


def point_latest(link_parent: Path, target: Path) -> bool:
    """`<parent>/latest` → the newest run (or sweep) dir, replaced atomically. A convenience only: where the parent
    is not writable (a run dir handed out inside a read-only folder) it is skipped with a warning (False)."""
    tmp = link_parent / f".latest.{os.getpid()}"
    try:
        link_parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target.resolve(), link_parent.resolve()))
        os.replace(tmp, link_parent / "latest")
    except OSError as error:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] no {link_parent / 'latest'} link "
                                   f"({error.strerror or error}); the run goes on in {target}")
        return False
    return True


# ------------------------------------------------------------------------------------------------- local runs

def run_locally(handle: RunHandle, model_dir: str) -> None:
    """In this process (ranks as local processes, the service beside them); an error is recorded, not raised."""
    from p2o_hpc.cluster.local_run import run_local

    handle.state = "RUNNING"
    try:
        run_local(handle.cfg, handle.run_dir, model_dir)
        handle.state = "COMPLETED"
    except BaseException as error:  # noqa: BLE001 - one point's failure is reported, its siblings go on
        if isinstance(error, KeyboardInterrupt):
            raise
        handle.state = "FAILED"
        handle.error = f"{type(error).__name__}: {error}"
        atomic_write_text(handle.run_dir.error, traceback.format_exc())


# ------------------------------------------------------------------------------------------------- SLURM runs

def _state(job) -> str:
    from p2o_hpc.cluster.slurm_jobs import job_state

    return job_state(job)


def submit_to_slurm(handle: RunHandle, model_dir: str) -> bool:
    """Submit the learner (and its service); a refused submission (sbatch's error) marks this run FAILED and
    cancels what was already submitted for it. False when it failed."""
    from p2o_hpc.cluster.slurm_jobs import needs_gepa_service, submit_gepa_service, submit_learner

    try:
        handle.learner = submit_learner(handle.cfg, handle.run_dir, model_dir)
        if needs_gepa_service(handle.cfg):
            handle.service = submit_gepa_service(handle.cfg, handle.run_dir)
            handle.service_jobs.append(handle.service.job_id)
    except Exception as error:  # noqa: BLE001 - submitit.FailedJobError carries sbatch's stderr
        if handle.learner is not None:
            handle.learner.cancel(check=False)
        handle.learner = handle.service = None
        handle.state, handle.error = "FAILED", f"not submitted: {str(error).strip()[:400]}"
        return False
    _write_jobs(handle)
    return True


def _write_jobs(handle: RunHandle) -> None:
    atomic_write_text(handle.run_dir.jobs, json.dumps(
        {"learner": handle.learner.job_id, "gepa_service": handle.service_jobs}, indent=1))


def poll_slurm(handle: RunHandle, console: Console) -> None:
    """One supervision step: learner state; restart or cancel the service job."""
    from p2o_hpc.cluster.slurm_jobs import submit_gepa_service

    if handle.learner is None:  # never submitted
        return
    if handle.state not in TERMINAL:
        handle.state = _state(handle.learner)
        if handle.state in TERMINAL:
            handle.learner_ended_at = time.time()
            if handle.state != "COMPLETED":
                handle.error = _job_error(handle.learner)
    if handle.service is None:
        return
    service_state = _state(handle.service)
    learner_alive = handle.state not in TERMINAL
    # A service that ended by itself (COMPLETED: it saw FINISHED, just before the learner's job ended) or that
    # reported a failure (the learner stops with that cause) is not restarted; one that died is.
    died = service_state in TERMINAL and service_state != "COMPLETED"
    if learner_alive and died and not handle.run_dir.service_ended_on_purpose():
        if len(handle.service_jobs) <= handle.cfg.gepa.max_restarts:
            console.print(f"[yellow]{handle.name}: GEPA service job {handle.service.job_id} ended ({service_state}) "
                          f"while the learner runs: resubmitting[/yellow]")
            handle.service = submit_gepa_service(handle.cfg, handle.run_dir)
            handle.service_jobs.append(handle.service.job_id)
            _write_jobs(handle)
    elif not learner_alive and service_state not in TERMINAL:
        grace = SERVICE_GRACE_S if handle.state == "COMPLETED" else 0.0
        if time.time() - (handle.learner_ended_at or 0) >= grace:
            handle.service.cancel(check=False)


def _job_error(job) -> str:
    """The exception line of the first task's log (`[rank0]: ValueError: …`), else SLURM's own last word."""
    try:
        lines = [line for line in (job.stderr() or "").splitlines() if line.strip()]
    except Exception:  # noqa: BLE001 - no log yet (never started)
        lines = []
    exception = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*)$")
    for line in reversed(lines):
        match = exception.match(line.strip())
        if match:
            return match.group(1)[:400]
    return (lines[-1][:400] if lines else "") or f"job {job.job_id} ended {job.state}"


def supervise(handles: list[RunHandle], console: Console, poll_s: float) -> None:
    """Until every learner (and service) job has ended, with a live table of their states."""
    from rich.live import Live

    from submitit.slurm.slurm import SlurmJob

    with Live(summary_table(handles, live=True), console=console, refresh_per_second=1, transient=True) as live:
        while not all(handle.done for handle in handles):
            # One sacct call per poll for every job: submitit's own cadence backs off to once a minute (up to 10).
            SlurmJob.watcher.update()
            for handle in handles:
                poll_slurm(handle, console)
            live.update(summary_table(handles, live=True))
            if not all(handle.done for handle in handles):
                time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------- summary

def launcher_console() -> Console:
    """The terminal's width; in a batch log (not a terminal) wide enough that the table stays one line a run."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def final_metrics(run_dir: RunDir) -> dict:
    """The last value of every metric (also of a run killed mid-write); {} before the first step."""
    if not run_dir.metrics.exists():
        return {}
    last = {}
    for row in read_metrics(run_dir):
        last.update(row)  # later rows win; epoch-end keys (hard/size) survive
    return last


def summary_rows(handles: list[RunHandle]) -> list[dict]:
    rows = []
    for handle in handles:
        metrics = final_metrics(handle.run_dir)
        rows.append({
            "point": handle.name,
            "learner_job": getattr(handle.learner, "job_id", None) or ("local" if handle.cfg.cluster.kind == "local" else "-"),
            "gepa_jobs": ",".join(handle.service_jobs) or "-",
            "state": handle.state,
            "step": metrics.get("step"),
            "reward": metrics.get("reward/mean"),
            "hard": metrics.get("hard/size"),
            "run_dir": str(handle.run_dir.path),
            "error": handle.error,
        })
    return rows


def summary_table(handles: list[RunHandle], *, live: bool = False) -> Table:
    parents = {str(handle.run_dir.path.parent) for handle in handles}
    table = Table(title=None if live else f"p2o_hpc runs in {', '.join(sorted(parents))}")
    for column in ("point", "learner job", "GEPA jobs", "state", "step", "reward/mean", "hard"):
        table.add_column(column, overflow="fold")
    for row in summary_rows(handles):
        color = {"COMPLETED": "green", "FAILED": "red"}.get(row["state"], "yellow")
        table.add_row(row["point"], str(row["learner_job"]), row["gepa_jobs"], f"[{color}]{row['state']}[/{color}]",
                      "-" if row["step"] is None else str(row["step"]),
                      "-" if row["reward"] is None else f"{row['reward']:.3f}",
                      "-" if row["hard"] is None else str(row["hard"]))
    return table


def report(handles: list[RunHandle], console: Console, summary_dir: Optional[Path]) -> bool:
    """Print the table (and errors), write summary.json/summary.md; True when every run completed."""
    console.print(summary_table(handles))
    for handle in handles:
        if handle.state != "COMPLETED":
            console.print(f"[red]{handle.name}: {handle.state}[/red] {handle.error} (logs: {handle.run_dir.path})")
    if summary_dir is not None:
        rows = summary_rows(handles)
        atomic_write_text(summary_dir / "summary.json", json.dumps(rows, indent=1))
        header = "| point | learner job | GEPA jobs | state | step | reward/mean | hard | run dir |\n|---|---|---|---|---|---|---|---|\n"
        lines = [f"| {r['point']} | {r['learner_job']} | {r['gepa_jobs']} | {r['state']} | {r['step']} | "
                 f"{r['reward'] if r['reward'] is None else round(r['reward'], 4)} | {r['hard']} | {r['run_dir']} |"
                 for r in rows]
        atomic_write_text(summary_dir / "summary.md", header + "\n".join(lines) + "\n")
    return all(handle.state == "COMPLETED" for handle in handles)
