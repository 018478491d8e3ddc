"""trainer.profile_steps: a torch-profiler trace of chosen steps, on every learner rank.

A profiled step runs under ``torch.profiler.profile`` (CPU activity, + CUDA kernels when CUDA is available); its
chrome trace goes to ``<run dir>/profile/step_<N>.rank<R>.json`` (RunDir.profile_trace; N 1-based, as metrics.jsonl
counts steps), written atomically once the step is done. The step's phases are named ranges ``phase/<name>``
(PhaseTimer.phase: weight_sync, generate, reward, refit_check, rollout_wait, gepa_wait, logprob, cd_logprob,
update). Open a trace in https://ui.perfetto.dev or chrome://tracing. A step that raises writes no trace.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from p2o_hpc.io_utils import fsync_dir
from p2o_hpc.run_dir import RunDir


def export_trace(profiler, path: Path) -> Path:
    """The profiler's chrome trace at `path`, atomically: exported next to it, fsynced, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        profiler.export_chrome_trace(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


class StepProfiler:
    """Profiles the steps in `steps` (1-based) on this rank; every other step runs as it would without it."""

    def __init__(self, steps, run_dir: RunDir, *, rank: int, console=None):
        self.steps, self.run_dir, self.rank, self.console = frozenset(steps), run_dir, rank, console

    @contextmanager
    def step(self, step: int):
        """Around the whole of step `step` (1-based); the trace is written when it ends without an error."""
        if step not in self.steps:
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            yield
        path = export_trace(profiler, self.run_dir.profile_trace(step, self.rank))
        if self.console is not None:
            self.console.print(f"step {step}: profiler trace → {path} (every rank: "
                               f"{path.parent / f'step_{step}.rank*.json'}; open in https://ui.perfetto.dev)")
