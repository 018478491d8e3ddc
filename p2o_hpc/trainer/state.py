"""What a checkpoint holds besides the megatron weights and optimizer: where the run is, so a resumed run
continues exactly (same data order, same seeds, same pending off-policy batch, same mined records)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel

from p2o_hpc.algo.hard_mining import HardSampleMiner
from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.data import PromptLoader
from p2o_hpc.records import StepBatch


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class TrainerState:
    def __init__(self, loader: PromptLoader, miner: HardSampleMiner, hooks: AlgorithmHooks):
        self.step = 0
        self.loader, self.miner, self.hooks = loader, miner, hooks
        self.pending: StepBatch | None = None  # one-step off-policy: the next step's batch, generated ahead
        # A step that finished an epoch is checkpointed before the epoch's end (the GEPA exchange may wait for hours
        # or fail): {"epoch", "metrics"} until its metrics line is written, so a resumed run does only that part again.
        self.epoch_end: dict | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(), "miner": self.miner.state_dict(),
                "pending": self.pending, "p2o": self.hooks.state_dict(), "rng": rng_state(),
                "epoch_end": self.epoch_end}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.miner.load_state_dict(state["miner"])
        self.pending = state["pending"]
        self.epoch_end = state.get("epoch_end")
        self.hooks.load_state_dict(state.get("p2o", {}))
        set_rng_state(state["rng"])
