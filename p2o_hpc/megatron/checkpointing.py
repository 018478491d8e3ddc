"""Megatron distributed checkpoints (model, optimizer, LR scheduler, step) that are never half-loaded.

Layout: ``<root>/step_<N>/`` written by ``dist_checkpointing`` into ``.step_<N>.tmp`` and renamed after every
rank finished and rank 0 wrote ``COMPLETE``; a folder without the marker (a job killed mid-write) is never
loaded. The saved model state is layout-independent, so a TP=2 checkpoint loads at TP=1 (resharding).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
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


def save_checkpoint(learner: Learner, root: str | Path) -> Path:
    """Collective. Returns the final folder ``root/step_<step>``."""
    root = Path(root)
    final = root / f"step_{learner.step}"
    staging = root / f".step_{learner.step}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(learner, is_loading=False, with_optimizer=True), str(staging))
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
    dist.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root; incomplete or temporary folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / COMPLETE_MARKER).exists()
    ]
    return max(complete)[1] if complete else None


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
