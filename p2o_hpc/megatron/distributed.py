"""torch.distributed + megatron parallel_state setup, and a local multi-process launcher for tools and tests.

Every init has a timeout: a missing peer must fail in seconds with a clear error, not hang a job or a test.

Two kinds of collectives, two groups. Megatron's groups (NCCL on GPU) carry the learner's tensors: every rank is in
step there, and `trainer.collective_timeout_s` bounds them (the NCCL watchdog kills a job whose collective waits
longer). The *control group* (gloo, CPU tensors and Python objects) carries the loop's coordination: rollouts
gathered from the engine hosts, preemption flags, P²O's template exchange. Its timeout is its own
(`control_timeout_s`), and a wait on something outside the job (the GEPA service) is a poll, one short broadcast
per `poll_s` (:func:`wait_together`), so no collective ever waits on GEPA.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from p2o_hpc.lease import terminate_when_gone
from p2o_hpc.megatron import cpu_compat

DEFAULT_INIT_TIMEOUT_S = 120

_control_group = None


def init_megatron(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    *,
    seed: int = 1234,
    timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    init_timeout_s: float | None = None,
    control_timeout_s: float | None = None,
) -> None:
    """Init the default process group from the env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), megatron's groups
    and the control group.

    `init_timeout_s` bounds the rendezvous (a peer that never starts fails the job), `timeout_s` megatron's
    collectives, `control_timeout_s` (default: `timeout_s`) one operation of the control group."""
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
            torch.cuda.set_device(local_device_index())
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
    init_control_group(control_timeout_s or timeout_s)


def init_control_group(timeout_s: float) -> None:
    """The control group over every rank of the initialised default group (init_megatron calls this; a test or tool
    that sets up torch.distributed itself calls it too)."""
    global _control_group
    _control_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def local_device_index() -> int:
    """This rank's GPU among the visible ones: LOCAL_RANK when the node's GPUs are all visible to every rank, 0 when
    SLURM binds one GPU per task (--gpus-per-task=1 / --gpu-bind=single: each task sees exactly one)."""
    visible = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {visible} GPUs are visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): the job asked for "
                           "fewer GPUs per node than ranks per node (parallel.gpus_per_node)")
    return local_rank


SOCKET_IFNAME_VARIABLES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def pin_socket_interface(name: str | None, master_addr: str) -> str | None:
    """Pin NCCL's and gloo's bootstrap sockets to one network interface: `name` (cluster.network_interface), else
    the one this node reaches `master_addr` through. On nodes with several interfaces (ethernet, InfiniBand IPoIB,
    container bridges) each library otherwise picks one by itself, and two nodes may pick interfaces that do not
    reach each other: the rendezvous or the first collective hangs. A value the site already exported wins.
    Returns the interface pinned (None when nothing was set)."""
    import psutil

    if name is None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master_addr, 9))  # UDP: no packet is sent, the kernel only picks the route
                address = probe.getsockname()[0]
        except OSError:
            return None
        name = next((interface for interface, addresses in psutil.net_if_addrs().items()
                     if any(entry.address == address for entry in addresses)), None)
        if name is None or address.startswith("127."):
            return None
    elif name not in psutil.net_if_addrs():
        raise ValueError(f"cluster.network_interface={name!r} does not exist on {socket.gethostname()} "
                         f"(it has {', '.join(sorted(psutil.net_if_addrs()))})")
    for variable in SOCKET_IFNAME_VARIABLES:
        os.environ.setdefault(variable, name)
    return name


def control_group():
    """The gloo group over all ranks for the loop's coordination (CPU tensors and objects; see the module doc)."""
    if _control_group is None:
        raise RuntimeError("control_group(): init_megatron has not run in this process")
    return _control_group


def wait_together(poll: Callable[[], Any], poll_s: float) -> Any:
    """Collective: rank 0 calls `poll()` every `poll_s` seconds until it returns something other than None; every
    rank returns that value. Each round is one short broadcast on the control group, so however long the wait
    (GEPA evolving templates for hours), no collective waits longer than one poll. An exception raised by `poll`
    on rank 0 is raised on every rank (as RuntimeError elsewhere, naming rank 0's error)."""
    rank = dist.get_rank()
    while True:
        box: list = [None]
        if rank == 0:
            try:
                value = poll()
            except BaseException as error:  # every rank must leave the loop, not wait for the next round
                box[0] = ("error", f"{type(error).__name__}: {error}")
                dist.broadcast_object_list(box, src=0, group=control_group())
                raise
            box[0] = None if value is None else ("value", value)
        dist.broadcast_object_list(box, src=0, group=control_group())
        if box[0] is not None:
            kind, payload = box[0]
            if kind == "error":
                raise RuntimeError(f"rank 0 failed while the ranks waited together: {payload}")
            return payload
        time.sleep(poll_s)


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
    global _control_group
    _control_group = None
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
