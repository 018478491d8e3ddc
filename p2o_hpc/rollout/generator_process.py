"""The generator interface, served by a VLLMGenerator in a spawned child and proxied over a pipe.

The learner ranks already own a torch.distributed default group, and an in-process vLLM would set up its
own distributed state, change torch's thread count and environment variables (vLLM-CPU rewrites
LD_PRELOAD, LOCAL_WORLD_SIZE, ...) in the learner's process. A child keeps both apart and gives vLLM's
memory back when it exits.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from p2o_hpc.rollout.generator import Generator, GeneratorDied, GeneratorError
from p2o_hpc.rollout.vllm_engine import VLLMGenerator, checked_model_dir, cuda_available
from p2o_hpc.rollout.weight_sync import (
    Bucket,
    NcclWeightSender,
    WeightReceiver,
    WeightUpdateStats,
    checkpoint_weight_names,
    is_tied,
    push_weights,
)

# Variables a torchrun/SLURM launcher sets for the learner; vLLM in the child must not join that world.
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _declared_methods(protocol: type) -> frozenset[str]:
    return frozenset(name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_"))


# Every call of the two engine interfaces. GeneratorProcess defines update_weights (the buckets are staged
# here, in the parent) and close itself; its __getattr__ forwards the others to the child.
_ENGINE_METHODS = _declared_methods(Generator) | _declared_methods(WeightReceiver)
# Calls that wake a sleeping engine: all of it, or (a weight update) its weights. A colocated engine reallocates
# what it slept on, so the learner's cached-but-free GPU blocks are handed back first.
_WAKING_METHODS = frozenset({"generate", "prompt_logprobs", "wake", "start_weight_update", "load_weights_from_dir"})
# Calls after which nothing of the engine sleeps any more (a weight update leaves the KV cache asleep).
_FULL_WAKE_METHODS = frozenset({"generate", "prompt_logprobs", "wake"})


def _describe(error: BaseException) -> tuple[str, str, str]:
    return type(error).__name__, str(error), "".join(traceback.format_exception(error))


def _child_main(conn, model_dir: str, kwargs: dict[str, Any], env: dict[str, str], drop: tuple[str, ...]) -> None:
    """Child entry: environment first (before vLLM is imported), then serve calls until close or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    for key in drop:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        generator = VLLMGenerator(model_dir, **kwargs)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        conn.send(("err", _describe(error)))
        return
    conn.send(("ok", {"pid": os.getpid(), "device": generator.device, "weight_transfer": generator.weight_transfer}))
    while True:
        try:
            method, args, call_kwargs = conn.recv()
        except (EOFError, OSError):
            break  # parent is gone
        if method == "close":
            generator.close()
            conn.send(("ok", None))
            break
        try:
            result = getattr(generator, method)(*args, **call_kwargs)
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            conn.send(("err", _describe(error)))
        else:
            conn.send(("ok", result))


class GeneratorProcess:
    """The Generator interface, served by a VLLMGenerator(model_dir, **generator_kwargs) in a spawned child.

    update_weights writes the safetensors files here in the parent (tensors do not cross the pipe
    cheaply) and has the child reload from that folder; on GPU with weight_transfer 'ipc' only CUDA
    IPC handles cross the pipe. A child exception is re-raised as GeneratorError carrying the child's
    traceback; a dead child raises GeneratorDied (calls poll the pipe and the child, never hang).
    call_timeout (seconds, None = wait while the child lives) bounds each call.
    On GPU with tensor_parallel_size 1 the child sees only the parent's current CUDA device (the
    colocated layout: learner and vLLM share it, with sleep mode); pass env to choose otherwise. After a
    sleep(), every call that wakes the engine first empties this process's CUDA cache (the learner's
    free blocks), so the engine can take its memory back.
    """

    POLL_S = 0.2

    def __init__(
        self,
        model_dir: str | Path,
        *,
        start_timeout: float = 900.0,
        call_timeout: float | None = None,
        env: dict[str, str] | None = None,
        **generator_kwargs: Any,
    ):
        self.model_dir = checked_model_dir(model_dir)
        self.call_timeout = call_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._death: str | None = None
        self._nccl: NcclWeightSender | None = None
        self.may_be_asleep = False  # sleep() sent and no full wake since: waking calls release cached GPU memory
        self.tensor_parallel_size = int(generator_kwargs.get("tensor_parallel_size", 1))
        self._expected_names = (
            checkpoint_weight_names(self.model_dir) if generator_kwargs.get("check_weight_names", True) else None
        )
        self._tied = is_tied(self.model_dir)

        child_env = dict(env or {})
        if cuda_available():
            if self.tensor_parallel_size == 1:
                child_env.setdefault("CUDA_VISIBLE_DEVICES", _parent_physical_gpu())
        else:
            from p2o_hpc.rollout.vllm_env import vllm_cpu_env

            # Defaults only: the parent's own settings (e.g. a bigger VLLM_CPU_KVCACHE_SPACE) win.
            defaults = {key: value for key, value in vllm_cpu_env().items() if key not in os.environ}
            child_env = {**defaults, **child_env}

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        # Not a daemon: daemonic processes may not have children, and vLLM on GPU spawns its engine core.
        self._process = context.Process(
            target=_child_main,
            args=(child_conn, str(self.model_dir), generator_kwargs, child_env, _LAUNCHER_VARS),
            name="p2o-generator",
        )
        self._process.start()
        child_conn.close()
        self._finalizer = weakref.finalize(self, _reap, self._process, self._conn)
        try:
            info = self._receive("start-up", start_timeout)
        except BaseException:
            self._kill()
            raise
        self.pid: int = info["pid"]
        self.device: str = info["device"]
        self.weight_transfer: str = info["weight_transfer"]
        self.last_update: WeightUpdateStats | None = None

    # -- engine calls -----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """The engine calls this class does not define (generate, prompt_logprobs, sleep, ...) run in the child."""
        if name not in _ENGINE_METHODS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return functools.partial(self._call, name)

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Stages the buckets here and has the child load them through the forwarded WeightReceiver calls."""
        self.last_update = push_weights(
            buckets,
            self,
            method=self.weight_transfer,
            expected=self._expected_names,
            tied=self._tied,
            nccl=self._nccl,
        )

    def connect_nccl(self, master_address: str, master_port: int) -> None:
        """Join the child's NCCL weight-transfer group as rank 0 (weight_transfer='nccl', GPU only)."""
        if self.weight_transfer != "nccl":
            raise RuntimeError("connect_nccl needs weight_transfer='nccl'")
        self._nccl = NcclWeightSender(master_address, master_port, world_size=1 + self.tensor_parallel_size)
        self._nccl.connect(self)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self, timeout: float = 60.0) -> None:
        """Ask the child to shut vLLM down and exit; terminate it if it does not within timeout."""
        if self._closed:
            return
        self._closed = True
        if self._nccl is not None:
            self._nccl.close()
        if self._process.is_alive():
            try:
                with self._lock:
                    self._conn.send(("close", (), {}))
                    deadline = time.monotonic() + timeout
                    while self._process.is_alive() and time.monotonic() < deadline:
                        if self._conn.poll(self.POLL_S):
                            self._conn.recv()
            except (OSError, EOFError):
                pass
        self._kill()

    def is_alive(self) -> bool:
        return not self._closed and self._process.is_alive()

    def __enter__(self) -> GeneratorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._death is not None:
            raise GeneratorDied(self._death)
        if self._closed:
            raise GeneratorDied(f"generator process for {self.model_dir} was closed")
        with self._lock:
            if not self._process.is_alive():
                raise self._died(method)
            if method in _WAKING_METHODS and self.may_be_asleep:
                release_cached_gpu_memory()
            try:
                self._conn.send((method, args, kwargs))
            except (OSError, EOFError, BrokenPipeError) as error:
                raise self._died(method) from error
            result = self._receive(method, self.call_timeout)
            if method == "sleep":
                self.may_be_asleep = True
            elif method in _FULL_WAKE_METHODS:
                self.may_be_asleep = False
            return result

    def _receive(self, what: str, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                ready = self._conn.poll(self.POLL_S)
            except (OSError, EOFError) as error:
                raise self._died(what) from error
            if ready:
                try:
                    status, payload = self._conn.recv()
                except (OSError, EOFError) as error:
                    raise self._died(what) from error
                if status == "ok":
                    return payload
                child_type, message, child_traceback = payload
                where = f"starting vLLM on {self.model_dir}" if what == "start-up" else f"{what}()"
                raise GeneratorError(
                    f"generator child failed in {where}: {child_type}: {message}\n"
                    f"--- child traceback ---\n{child_traceback}",
                    child_type,
                    child_traceback,
                )
            if not self._process.is_alive() and not self._conn.poll(0):
                raise self._died(what)
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                raise TimeoutError(
                    f"generator child gave no answer to {what} within {timeout:.0f} s; it has been killed"
                )

    def _died(self, what: str) -> GeneratorDied:
        self._process.join(timeout=1.0)
        code = self._process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        self._death = (
            f"generator child (pid {self._process.pid}) for {self.model_dir} {how} during {what}; "
            "its stderr above has the cause. Start a new GeneratorProcess."
        )
        self._kill()
        return GeneratorDied(self._death)

    def _kill(self) -> None:
        self._closed = True
        if self._finalizer.detach() is not None:
            _reap(self._process, self._conn, graceful=False)


def _reap(process: multiprocessing.process.BaseProcess, conn, graceful: bool = True) -> None:
    """The child must not outlive its GeneratorProcess (dropped without close(), interpreter exit).

    graceful: first ask it to shut vLLM down (a terminated child leaks its semaphores).
    """
    if graceful and process.is_alive():
        try:
            conn.send(("close", (), {}))
            process.join(timeout=15.0)
        except (OSError, ValueError):
            pass
    try:
        conn.close()
    except OSError:
        pass
    process.join(timeout=0)  # reap an already exited child
    if process.is_alive():
        process.terminate()
        process.join(timeout=10.0)
    if process.is_alive():
        process.kill()
        process.join(timeout=5.0)


def release_cached_gpu_memory() -> None:
    """The caching allocator's free blocks of this process back to the GPU, for an engine about to wake on it
    (no-op when this process never used CUDA)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _parent_physical_gpu() -> str:
    """The parent's current CUDA device as the child should see it (respecting CUDA_VISIBLE_DEVICES)."""
    import torch

    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[index].strip()
    return str(index)
