"""Main entry point, a Hydra app: ``python -m p2o_hpc.launch [experiment=smoke] [parallel=tp2] [key=value …]``.

Composes the config (conf/), resolves the model, writes the resolved config into the run dir, runs the learner
(cluster=local: local processes; cluster=slurm: submitit jobs, supervised until they end) and ends with one line
``run_dir=<path>`` that scripts grep for. ``-m`` sweeps go through p2o_hpc.cluster.sweep_launcher. Re-running
with the same ``hydra.run.dir``, or ``resume=<run dir>``, continues from the latest complete checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from p2o_hpc.config import RunConfig, register_configs, to_run_config, validate
from p2o_hpc.model_dir import resolve_model_dir
from p2o_hpc.run_dir import RunDir


def resumed(cfg: RunConfig, explicit: list[str]) -> tuple[RunConfig, Path]:
    """`resume=<run dir>`: that run's saved config. Only where it runs may change: `cluster=…`/`cluster.*` (composed
    together with the run's own saved overrides, as if it had been launched with them) and the placement
    `parallel.nodes` / `parallel.gpus_per_node` (the parallel layout itself stays)."""
    from hydra import compose

    run_dir = Path(cfg.resume).resolve()
    saved = RunDir(run_dir)
    if not saved.config.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: {saved.config} does not exist (not a run dir?)")

    def key(item: str) -> str:
        return item.lstrip("~+").partition("=")[0]

    def where(item: str) -> bool:
        return key(item) == "cluster" or key(item).startswith("cluster.")

    def bookkeeping(item: str) -> bool:
        return key(item) == "resume" or key(item).startswith("hydra.")

    placement = ("parallel.nodes", "parallel.gpus_per_node")
    changed = [item for item in explicit if not (where(item) or bookkeeping(item) or key(item) in placement)]
    if changed:
        raise ValueError(f"resume={cfg.resume} continues the run with its saved config; these overrides would "
                         f"change it: {changed} (only cluster=…, cluster.*, parallel.nodes, parallel.gpus_per_node may)")
    resumed_cfg = saved.load_config()
    new_cluster = [item for item in explicit if where(item)]
    if new_cluster:
        overrides_file = saved.overrides
        original = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        kept = [item for item in original if not (where(item) or bookkeeping(item))]
        resumed_cfg.cluster = to_run_config(compose(config_name="config", overrides=kept + new_cluster)).cluster
    for item in explicit:
        if key(item) in placement:
            value = item.partition("=")[2]
            setattr(resumed_cfg.parallel, key(item).split(".")[1], None if value == "null" else int(value))
    resumed_cfg.resume, resumed_cfg.run_dir = None, str(run_dir)
    return resumed_cfg, run_dir


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """One run (a -m sweep goes through p2o_hpc.cluster.sweep_launcher instead)."""
    from p2o_hpc.cluster.local_run import run_local
    from p2o_hpc.cluster.runs import (RunHandle, RunRefused, launcher_console, point_latest, preflight,
                                      prepare_run_dir, report, submit_to_slurm, supervise)

    run_cfg = to_run_config(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    try:  # config, model and data errors: one line each, before anything is written or started
        if run_cfg.resume:
            run_cfg, run_dir = resumed(run_cfg, overrides)
        else:
            run_dir = Path(run_cfg.run_dir or HydraConfig.get().runtime.output_dir).resolve()
        validate(run_cfg)
        model_dir = resolve_model_dir(run_cfg.model.path)
        preflight(run_cfg, model_dir)
    except (ValueError, FileNotFoundError) as error:
        raise RunRefused(str(error)) from error
    prepare_run_dir(run_cfg, RunDir(run_dir), overrides=None if cfg.resume else overrides)  # a resume keeps the original
    point_latest(run_dir.parent, run_dir)
    if run_cfg.cluster.kind == "local":
        run_local(run_cfg, RunDir(run_dir), model_dir)
    else:
        console = launcher_console()
        handle = RunHandle(name=run_dir.name, run_dir=RunDir(run_dir), cfg=run_cfg)
        if submit_to_slurm(handle, model_dir):
            console.print(f"submitted learner job {handle.learner.job_id}"
                          + (f" and GEPA service job {handle.service.job_id}" if handle.service else "")
                          + f" for {run_dir}")
            supervise([handle], console, run_cfg.cluster.poll_s)
        if not report([handle], console, summary_dir=None):
            print(f"run_dir={run_dir}", flush=True)
            sys.exit(1)
    print(f"run_dir={run_dir}", flush=True)


if __name__ == "__main__":
    main()
