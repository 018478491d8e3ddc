"""torch.distributed + megatron parallel_state setup, and a local multi-process launcher for tools and tests.

Every init has a timeout: a missing peer must fail in seconds with a clear error, not hang a job or a test.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from p2o_hpc.lease import terminate_when_gone
from p2o_hpc.megatron import cpu_compat

DEFAULT_INIT_TIMEOUT_S = 120


def init_megatron(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    *,
    seed: int = 1234,
    timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    init_timeout_s: float | None = None,
) -> None:
    """Init the default process group from the env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and megatron's groups.

    `init_timeout_s` bounds the rendezvous (a peer that never starts fails the job), `timeout_s` the collectives."""
    cpu_compat.enable()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel×pipeline_parallel = "
            f"{tensor_parallel}×{pipeline_parallel}"
        )
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=cpu_compat.distributed_backend(),
            store=rendezvous(init_timeout_s or timeout_s),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    model_parallel_cuda_manual_seed(seed)


def rendezvous(timeout_s: float) -> dist.TCPStore:
    """The TCP store every rank joins; rank 0 waits for all of them, so a missing peer fails in `timeout_s`."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(host, port, world_size, is_master=rank == 0,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=True)
    except (RuntimeError, TimeoutError) as error:  # DistStoreError / DistNetworkError subclass RuntimeError
        raise RuntimeError(
            f"rank {rank}/{world_size}: the rendezvous at {host}:{port} did not complete within {timeout_s:.0f} s "
            f"(parallel.init_timeout_s): a peer did not start or cannot reach rank 0 ({error})"
        ) from error


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple, launcher_pid: int) -> None:
    terminate_when_gone(launcher_pid)  # a killed launcher: its ranks stop as on SIGTERM (checkpoint, then exit)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    finally:
        shutdown()
        _reap_children()


def _reap_children(grace_s: float = 5.0) -> None:
    """A rank that fails may leave helper processes (its vLLM child) running; multiprocessing would join those
    non-daemon children before the rank exits, so the whole launch would hang instead of reporting the error.
    A rank that ends normally has closed them already."""
    children = mp.active_children()
    for child in children:
        child.join(timeout=grace_s / max(1, len(children)))
        if child.is_alive():
            child.terminate()
            child.join(timeout=10)
        if child.is_alive():
            child.kill()


def launch_local(fn: Callable, world_size: int, *args) -> None:
    """Run `fn(*args)` in `world_size` spawned processes on this machine; raises if any rank fails.

    `fn` must be importable (module level) because the processes are spawned, as vLLM and dist_checkpointing need.
    """
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args, os.getpid()), nprocs=world_size,
                       start_method="spawn", join=True)
