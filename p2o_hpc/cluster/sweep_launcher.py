"""The Hydra launcher behind ``python -m p2o_hpc.launch -m …``: every sweep point is composed and validated before
anything runs (a bad override names its point and key, and nothing is submitted), each point gets its own run dir
named from its overrides, points run where `cluster=` says, and a summary table ends the sweep.

Why not hydra-submitit-launcher: it composes each point inside the job (a typo fails on the cluster, minutes
later) and its launch() raises on the first failed point, so the others' results and the summary are lost.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from p2o_hpc.cluster.runs import preflight
from p2o_hpc.config import RunConfig, to_run_config, validate
from p2o_hpc.model_dir import resolve_model_dir
from p2o_hpc.run_dir import RunDir


class SweepPointsInvalid(CompactHydraException):
    """One or more sweep points do not compose or validate; nothing was submitted."""


class SweepFailed(CompactHydraException):
    """At least one sweep point did not complete (see the summary table)."""


def _task_config(sweep_config: DictConfig) -> DictConfig:
    task = copy.copy(sweep_config)
    with open_dict(task):
        del task["hydra"]
    return task


def compare_points(handles: list, console, out_dir: Path) -> None:
    """The points side by side (p2o_hpc.trainer.comparison: table, csv, Fig. 3/4) once two of them logged steps.
    A point it cannot read is named and left out: the runs themselves are done and summarized already."""
    from p2o_hpc.trainer.comparison import summarize, write_comparison

    points = []
    for handle in handles:
        if not handle.run_dir.metrics.exists():
            continue
        try:
            points.append(summarize(handle.run_dir.path, handle.name))
        except (OSError, ValueError) as error:
            console.print(f"[yellow]comparison: {handle.name} left out: {error}[/yellow]")
    if len(points) >= 2:
        write_comparison(points, out_dir, console, title=f"sweep {out_dir.name}: the points side by side")


def point_dir_name(subdir: str, max_len: int = 200) -> str:
    """One path component per point: a path value (data.train=/a/b.jsonl) keeps its text with "/" → "_";
    an over-long name keeps its start and gets a hash, so it still names the point and stays unique."""
    name = subdir.replace("/", "_").strip() or "default"
    if len(name) > max_len:
        name = f"{name[: max_len - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


class SweepLauncher(Launcher):
    def __init__(self, **_: object) -> None:
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def _compose(self, overrides: list[str], idx: int,
                 model_dirs: dict[str, str | Exception]) -> tuple[RunConfig, Path, DictConfig, str]:
        """One point, checked as a single run is (validate, its model folder, preflight); model_dirs resolves each
        distinct model.path once (a download, or the same error for every point that names it)."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # resolves ${hydra:…} (the point's subdir) below
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / point_dir_name(str(sweep_config.hydra.sweep.subdir))
        cfg = to_run_config(_task_config(sweep_config))
        if cfg.resume:
            raise ValueError("resume= is for one run, not a -m sweep")
        cfg.run_dir = str(run_dir.resolve())
        if cfg.logging.wandb.group is None:
            cfg.logging.wandb.group = Path(str(sweep_config.hydra.sweep.dir)).name
        validate(cfg)
        if cfg.model.path not in model_dirs:
            try:
                model_dirs[cfg.model.path] = resolve_model_dir(cfg.model.path)
            except (ValueError, FileNotFoundError) as error:
                model_dirs[cfg.model.path] = error
        model_dir = model_dirs[cfg.model.path]
        if isinstance(model_dir, Exception):
            raise model_dir
        preflight(cfg, model_dir)
        return cfg, run_dir.resolve(), sweep_config, model_dir

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from p2o_hpc.cluster.runs import (RunHandle, launcher_console, point_latest, prepare_run_dir, report,
                                          run_locally, submit_to_slurm, supervise)

        setup_globals()
        console = launcher_console()
        points, invalid, model_dirs = [], [], {}
        for offset, overrides in enumerate(job_overrides):
            try:
                points.append((list(overrides), *self._compose(list(overrides), initial_job_idx + offset, model_dirs)))
            except Exception as error:  # noqa: BLE001 - collected so every bad point is named at once
                invalid.append(f"  point #{initial_job_idx + offset} [{' '.join(overrides)}]: {error}")
        if invalid:
            raise SweepPointsInvalid(f"{len(invalid)} of {len(job_overrides)} sweep points are invalid; nothing "
                                     "was submitted:\n" + "\n".join(invalid))
        names = [run_dir.name for _, _, run_dir, _, _ in points]
        if len(set(names)) != len(names):
            raise SweepPointsInvalid(f"two sweep points would share a run dir: {names}")
        kinds = {cfg.cluster.kind for _, cfg, _, _, _ in points}
        if len(kinds) > 1:
            raise SweepPointsInvalid(f"a sweep runs all its points on one kind of cluster, not {sorted(kinds)}")

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        point_latest(sweep_dir.parent, sweep_dir)
        handles = []
        for overrides, cfg, run_dir, _, model_dir in points:
            prepare_run_dir(cfg, RunDir(run_dir), overrides=overrides)
            handles.append((RunHandle(name=run_dir.name, run_dir=RunDir(run_dir), cfg=cfg), model_dir))

        if kinds == {"local"}:
            for index, (handle, model_dir) in enumerate(handles):
                console.rule(f"point {index + 1}/{len(handles)}: {handle.name}")
                run_locally(handle, model_dir)
        else:
            for handle, model_dir in handles:
                if submit_to_slurm(handle, model_dir):
                    console.print(f"{handle.name}: learner job {handle.learner.job_id}"
                                  + (f", GEPA service job {handle.service.job_id}" if handle.service else ""))
                else:
                    console.print(f"[red]{handle.name}: {handle.error}[/red]")
            supervise([h for h, _ in handles], console, min(h.cfg.cluster.poll_s for h, _ in handles))
        report([h for h, _ in handles], console, summary_dir=sweep_dir)
        compare_points([h for h, _ in handles], console, sweep_dir)

        results = []
        for (overrides, cfg, run_dir, sweep_config, _), (handle, _) in zip(points, handles):
            ok = handle.state == "COMPLETED"
            results.append(JobReturn(
                overrides=overrides, cfg=_task_config(sweep_config), hydra_cfg=sweep_config,
                working_dir=str(run_dir), task_name=str(sweep_config.hydra.job.name),
                status=JobStatus.COMPLETED if ok else JobStatus.FAILED,
                _return_value=str(run_dir) if ok else SweepFailed(
                    f"sweep point {handle.name} ended {handle.state}: {handle.error} (summary: {sweep_dir}/summary.md)"),
            ))
        for handle, _ in handles:
            print(f"run_dir={handle.run_dir.path}", flush=True)
        return results
