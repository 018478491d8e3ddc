"""Megatron distributed checkpoints (model, optimizer, LR scheduler, step) that are never half-loaded.

Layout: ``<root>/step_<N>/`` written by ``dist_checkpointing`` into ``.step_<N>.tmp`` and renamed after every
rank finished and rank 0 wrote ``COMPLETE``; a folder without the marker (a job killed mid-write) is never
loaded. The saved model state is layout-independent, so a TP=2 checkpoint loads at TP=1 (resharding).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.utils import unwrap_model

from p2o_hpc.megatron.training import Learner

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sharded_state(learner: Learner, *, is_loading: bool, with_optimizer: bool) -> dict:
    model_state = unwrap_model(learner.model).sharded_state_dict()
    state = {"model": model_state}
    if with_optimizer:
        state["optimizer"] = learner.optimizer.sharded_state_dict(model_state, is_loading=is_loading)
        state["scheduler"] = learner.scheduler.state_dict()
        state["step"] = learner.step
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _results_queue_in_process() -> None:
    """megatron's file writer returns its results through a multiprocessing Manager queue, made for async saves
    that run in another process; the Manager's server process, spawned on the first save, outlives a killed rank
    (and keeps the resource tracker alive with it). Our saves are synchronous, the queue's writer and reader are
    this process, so a plain queue does the same without a process."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(learner: Learner, root: str | Path, *, rank_state: dict | None = None, keep: int | None = None) -> Path:
    """Collective. Returns the final folder ``root/step_<step>``.

    `rank_state`: this rank's non-tensor-parallel state (RNG states, data position, …), saved inside the same
    atomic folder as ``rank_<r>.pt``. `keep`: delete all but the newest `keep` complete checkpoints afterwards.
    """
    root = Path(root)
    final = root / f"step_{learner.step}"
    staging = root / f".step_{learner.step}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    _results_queue_in_process()
    dist_checkpointing.save(_sharded_state(learner, is_loading=False, with_optimizer=True), str(staging))
    if rank_state is not None:
        with open(staging / f"rank_{dist.get_rank()}.pt", "wb") as handle:
            torch.save(rank_state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    dist.barrier()
    if dist.get_rank() == 0:
        marker = staging / COMPLETE_MARKER
        with open(marker, "w") as handle:
            handle.write(f"{learner.step}\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _fsync_dir(root)
        if keep is not None:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``step_<N>`` checkpoint folder; None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first; incomplete or temporary folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None and (path / COMPLETE_MARKER).exists():
            steps.append((step, path))
    return [path for _, path in sorted(steps)]


def load_rank_state(checkpoint: str | Path) -> dict | None:
    """This rank's `rank_state` from `save_checkpoint`, or None if it was saved without one."""
    path = Path(checkpoint) / f"rank_{dist.get_rank()}.pt"
    return torch.load(path, weights_only=False) if path.exists() else None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root; incomplete or temporary folders are ignored."""
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def load_checkpoint(learner: Learner, checkpoint: str | Path, *, with_optimizer: bool = True) -> None:
    """Collective. `with_optimizer=False` loads weights only, which is what a change of TP/PP layout allows."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / COMPLETE_MARKER).exists():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    state = dist_checkpointing.load(
        _sharded_state(learner, is_loading=True, with_optimizer=with_optimizer), str(checkpoint)
    )
    unwrap_model(learner.model).load_state_dict(state["model"])
    if with_optimizer:
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        learner.step = int(state["step"])
    # Keep ranks in step: none may train on until every rank has its state back.
    torch.distributed.barrier()
