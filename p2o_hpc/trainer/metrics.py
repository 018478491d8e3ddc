"""Where step metrics go: the run dir's ``metrics.jsonl`` (always) and wandb (offline unless configured online).

Only rank 0 logs. The API key, when online, comes from the environment (WANDB_API_KEY) and is never logged.

metrics.jsonl is the run's record: one line per step, continuous over requeues (a resumed job truncates the steps
it redoes). wandb offline is not: it ignores `resume`, so each job of a requeued run writes its own
``<run dir>/wandb/offline-run-*`` (same id, steps restarting at the checkpoint). Upload a run with
``python tools/sync_wandb.py <run dir> --online``, which rebuilds one wandb run from metrics.jsonl; do not
`wandb sync` the per-job folders.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.run_dir import RunDir


def phase_range(name: str) -> str:
    """The profiler range of PhaseTimer.phase(name): ``phase/<name>`` (its seconds are the metric time/<name>)."""
    return f"phase/{name}"


_nvtx: bool | None = None  # CUDA available: asked on the first phase, not at import (a process may fork before)


class PhaseTimer:
    """Wall-clock seconds per named phase of one step (generate / reward / logprob / update / weight_sync …).

    Every phase is also a named range, ``phase/<name>`` (phase_range): a torch.profiler record_function, which
    trainer.profile_steps' traces show (p2o_hpc.trainer.profiling), and, when CUDA is available, an NVTX range,
    which `nsys profile` shows on the GPU timeline. Without a profiler running, a phase costs only the
    record_function call (and the NVTX push/pop on a GPU)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        import torch  # here: tools/sync_wandb.py imports this module and needs no torch

        global _nvtx
        if _nvtx is None:
            _nvtx = torch.cuda.is_available()
        label = phase_range(name)
        start = time.perf_counter()
        with torch.profiler.record_function(label):
            if _nvtx:
                torch.cuda.nvtx.range_push(label)
            try:
                yield
            finally:
                if _nvtx:
                    torch.cuda.nvtx.range_pop()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def wandb_run_id(run_dir: RunDir) -> str:
    """The run dir's wandb id, made on first use and kept with the run: every job of it, and the run that
    tools/sync_wandb.py rebuilds, is the same wandb run."""
    id_file = run_dir.wandb_run_id
    if id_file.exists():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id)
    return run_id


class MetricsSink:
    def __init__(self, run_dir: RunDir, *, wandb_mode: str, project: str, entity: str | None, name: str | None,
                 config: dict, group: str | None = None):
        self.path = run_dir.metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            # One wandb run per run dir, resumed with it online (offline ignores `resume`: see the module docstring).
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                mode=wandb_mode, project=project, entity=entity, name=name, group=group, id=wandb_run_id(run_dir),
                resume="allow", dir=str(run_dir.path), config=config,
            )
            if wandb_mode == "offline":  # in the job's log: where this job's part went, and how to upload the run
                print(f"wandb offline: this job's part of the run is {Path(self._wandb.dir).parent}; upload the "
                      f"whole run with `python tools/sync_wandb.py {run_dir.path} --online`", flush=True)

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **metrics, "_timestamp": time.time()}  # wall clock, as wandb's own _timestamp
        # Appended line by line: each line is one complete JSON record; a resumed run truncates what it redoes.
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def truncate_after(self, step: int) -> int:
        """On resume: drop rows of steps after the checkpoint (they will be recomputed), and any line that is not
        a whole record (a job killed mid-write tears its last line). Returns how many torn lines were dropped."""
        if not self.path.exists():
            return 0
        kept, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if row_step <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return torn

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
