"""One wandb run per run dir, however many SLURM jobs it took: rebuilt from ``metrics.jsonl`` and uploaded.

wandb ignores `resume` in offline mode (wandb 0.31): each job of a preempted-and-requeued run writes its own
``<run dir>/wandb/offline-run-*`` folder with the run's id, each starting a fresh run at the step it resumed from, so
the steps between the checkpoint and the kill are in two folders (the killed job's abandoned values and the resumed
job's). ``metrics.jsonl`` is already the run's one continuous series (a resumed job truncates the steps it redoes),
so this tool writes it as a new offline run: the run dir's wandb id, name, project, entity and group, its
config.yaml as the wandb config, every step once in step order with its own wall-clock ``_timestamp``.

    python tools/sync_wandb.py <run dir> [<run dir> …]             # rebuild; prints the `wandb sync` command
    python tools/sync_wandb.py <run dir> … --online [--project P] [--entity E]   # rebuild and upload

--online uploads with `wandb sync` (the API key from WANDB_API_KEY, or a stored `wandb login`); a sweep's points
are `<sweep dir>/*/`. Sync a run once, when it has ended: the rebuilt run uses the run dir's wandb id, so syncing
it again (or also syncing the per-job ``wandb/offline-run-*`` folders) writes into the same wandb run twice. A run
logged online from its jobs already has that id on the server: to see its rebuilt series, delete it there first.

The rebuilt run lives in ``<run dir>/wandb_sync/``: each sync builds a new ``build-*`` folder and only then points
``current`` at it (a crash leaves the previous sync as it was); the older builds are removed.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from p2o_hpc.io_utils import fsync_dir
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.metrics import wandb_run_id
from p2o_hpc.trainer.report import read_metrics



def series(run_dir: RunDir) -> tuple[list[dict], int]:
    """metrics.jsonl as one row per step in step order, and how many rows a later row of the same step replaced
    (none in a run the trainer wrote; the later row is the recomputed one)."""
    by_step: dict[int, dict] = {}
    rows = read_metrics(run_dir)  # a torn last line (a job killed mid-write) is skipped
    for row in rows:
        by_step[int(row["step"])] = row
    return [by_step[step] for step in sorted(by_step)], len(rows) - len(by_step)


def wandb_settings(run_dir: RunDir, project: str | None, entity: str | None) -> dict:
    """wandb.init's arguments for the run, as the run's jobs passed them (MetricsSink), from its config.yaml."""
    config = OmegaConf.to_container(OmegaConf.load(run_dir.config), resolve=True)
    logged = config.get("logging", {}).get("wandb", {})
    return dict(id=wandb_run_id(run_dir), name=logged.get("name") or run_dir.name,
                project=project or logged.get("project") or "p2o_hpc", entity=entity or logged.get("entity"),
                group=logged.get("group"), config=config)


def build_offline_run(run_dir: RunDir, build: Path, rows: list[dict], init: dict) -> Path:
    """The rows as one finished offline wandb run under `build`; returns its offline-run folder."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    # The rebuilding process's own console, system metrics and code are not the run's.
    settings = wandb.Settings(console="off", save_code=False, x_disable_stats=True, x_disable_meta=True,
                              x_disable_machine_info=True)
    run = wandb.init(mode="offline", dir=str(build), settings=settings, **init)
    try:
        for row in rows:
            metrics = {key: value for key, value in row.items() if key != "step"}  # `_timestamp` is kept as logged
            run.log(metrics, step=int(row["step"]))
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    folders = list((build / "wandb").glob(f"offline-run-*-{init['id']}"))
    assert len(folders) == 1, folders
    return folders[0]


def rebuild(run_dir: RunDir, *, project: str | None = None, entity: str | None = None) -> Path:
    """Rebuild the run dir's wandb run from metrics.jsonl; returns the offline-run folder to `wandb sync`."""
    if not run_dir.metrics.is_file() or not run_dir.config.is_file():
        raise FileNotFoundError(f"{run_dir.path}: not a run dir with metrics (config.yaml, metrics.jsonl)")
    rows, replaced = series(run_dir)
    if not rows:
        raise ValueError(f"{run_dir.metrics}: no step logged yet")
    if replaced:
        print(f"{run_dir.metrics}: {replaced} row(s) of a step logged again; the later row is kept", file=sys.stderr)
    folder = run_dir.wandb_sync
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # one sync of a run dir at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = folder / f"build-{time.time_ns()}"
        try:
            offline = build_offline_run(run_dir, build, rows, wandb_settings(run_dir, project, entity))
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        # Publish: a new symlink renamed over `current` (atomic); then the builds it no longer points at go.
        link = folder / f".current.{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(build.name)
        os.replace(link, folder / "current")
        fsync_dir(folder)
        for old in folder.glob("build-*"):
            if old != build:
                shutil.rmtree(old, ignore_errors=True)
    print(f"{run_dir.path}: steps {rows[0]['step']}..{rows[-1]['step']} ({len(rows)} rows) as wandb run "
          f"{offline.name.rsplit('-', 1)[-1]}")
    return offline


def upload(offline: Path) -> None:
    """`wandb sync` of exactly this folder (wandb reads the API key itself; it is never passed or printed here)."""
    if not os.environ.get("WANDB_API_KEY"):
        print("WANDB_API_KEY is not set: wandb uses its stored login (`wandb login`)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "wandb", "sync", str(offline)], check=True, stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--online", action="store_true", help="upload with `wandb sync` (else: print the command)")
    parser.add_argument("--project", help="wandb project (default: the run's logging.wandb.project)")
    parser.add_argument("--entity", help="wandb entity (default: the run's logging.wandb.entity)")
    args = parser.parse_args(argv)
    try:
        offline = [rebuild(RunDir(path), project=args.project, entity=args.entity) for path in args.run_dirs]
        for folder in offline:
            if args.online:
                upload(folder)
            else:
                print(f"wandb sync {folder}")
    except (FileNotFoundError, ValueError) as error:  # not a run dir, nothing logged yet: one line, no traceback
        print(f"sync_wandb: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"sync_wandb: `wandb sync` exited with status {error.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
