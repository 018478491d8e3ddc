"""Preemption and walltime: a signal or a near deadline turns into a checkpoint at the next step boundary.

SLURM sends SIGUSR2 `cluster.signal_delay_s` before the walltime ends (submitit's `--signal`) and on preemption;
`scancel` and preemption send SIGTERM. The handler only sets a flag: the learner finishes its current step, every
rank agrees through one all-reduce, they checkpoint together and stop; then rank 0 requeues (SlurmLearnerTask).
A step that would outlive the allocation is abandoned instead: rank 0 requeues from the last checkpoint before SLURM
kills the job, and the resumed run redoes that step (its metrics were never written).

Save-before-deadline: when the next regular checkpoint would come after the walltime, checkpoint now (once).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from p2o_hpc.megatron.distributed import control_group

DEADLINE_ENV = "P2O_JOB_DEADLINE"  # unix time at which this allocation ends (set by the SLURM learner task)


def parse_slurm_duration(text: str) -> Optional[float]:
    """squeue's %L / %l: "[D-]HH:MM:SS", "MM:SS", "UNLIMITED", "INVALID" → seconds (None when unlimited)."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not match:
        return None
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_time_left_s(job_id: str) -> Optional[float]:
    """The allocation's remaining walltime, from squeue; None when unknown or unlimited."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_duration(out.stdout) if out.returncode == 0 else None


def should_checkpoint_early(*, remaining_s: Optional[float], step_s: float, steps_to_next_save: int,
                            margin_s: float) -> bool:
    """True when the next regular checkpoint would land after the deadline (less a margin for saving)."""
    if remaining_s is None:
        return False
    return steps_to_next_save * step_s > remaining_s - margin_s


class StopSignal:
    """Flags set by SIGUSR2/SIGTERM, and the allocation's deadline; polled by all ranks at step boundaries."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        deadline = os.environ.get(DEADLINE_ENV)
        self.deadline: Optional[float] = float(deadline) if deadline else None
        self.saved_early = False
        self._abandon: Optional[threading.Timer] = None
        self._abandon_after_s: Optional[float] = None
        self._on_abandon: Optional[Callable[[], None]] = None

    def install(self) -> "StopSignal":
        """Call before any helper process starts. SLURM signals every process of the job step, so a vLLM engine
        or a checkpoint writer would die of the USR2 (its default action): USR2 is blocked here instead, a mask
        that children inherit (the signal stays pending there, harmlessly), and a thread takes it with sigwait.
        SIGTERM keeps its default in children (they are stopped with it); in a submitit task it only sets the
        flag here. Elsewhere (local ranks) TERM keeps its default: the local launcher stops ranks with it."""
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (a test harness thread): signals stay default
        signal.signal(signal.SIGUSR2, self._handle)  # for threads started before the mask (none in the learner)
        if os.environ.get("SUBMITIT_FOLDER"):  # set by submitit in every task it runs
            signal.signal(signal.SIGTERM, self._handle)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        threading.Thread(target=self._wait_usr2, name="p2o-usr2", daemon=True).start()
        return self

    def _wait_usr2(self) -> None:
        while True:
            self._handle(signal.sigwait({signal.SIGUSR2}))

    def abandon_steps_after(self, seconds: float, callback: Callable[[], None]) -> None:
        """After a USR2, call `callback` (requeue) if no step boundary is reached within `seconds`."""
        self._abandon_after_s, self._on_abandon = seconds, callback

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def requeue(self) -> bool:
        """USR2 asks for a requeue (walltime or preemption warning); a bare SIGTERM (scancel) does not."""
        return self.signum == signal.SIGUSR2

    def _handle(self, signum: int, frame=None) -> None:
        first = self.signum is None
        if self.signum != signal.SIGUSR2:  # USR2 wins: a preemption sends TERM then USR2
            self.signum = signum
        if first or signum == signal.SIGUSR2:
            print(f"[p2o] caught {signal.Signals(signum).name}: checkpoint at the end of this step", flush=True)
        if signum == signal.SIGUSR2 and self._on_abandon is not None and self._abandon is None:
            self._abandon = threading.Timer(self._abandon_after_s, self._abandon_now)
            self._abandon.daemon = True
            self._abandon.start()

    def _abandon_now(self) -> None:
        print("[p2o] the current step did not finish before the deadline: abandoned, requeueing from the last "
              "checkpoint", flush=True)
        self._on_abandon()

    def reached_boundary(self) -> None:
        """A step ended: the abandon timer is no longer needed (the checkpoint follows)."""
        if self._abandon is not None:
            self._abandon.cancel()

    def poll(self, *, step_s: float, steps_to_next_save: int, margin_s: float) -> tuple[bool, bool]:
        """(stop, checkpoint_early), agreed by every rank (any rank's signal stops all of them)."""
        remaining = None if self.deadline is None else self.deadline - time.time()
        early = not self.saved_early and should_checkpoint_early(
            remaining_s=remaining, step_s=step_s, steps_to_next_save=steps_to_next_save, margin_s=margin_s)
        flags = torch.tensor([int(self.requested), int(early)], dtype=torch.int64)  # CPU: the control group is gloo
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control_group())
        stop, early = bool(flags[0]), bool(flags[1])
        if stop:
            self.reached_boundary()
        if early:
            self.saved_early = True
        return stop, early
