"""Rollout generator: vLLM sampling for the learner, with in-place weight refresh.

`VLLMGenerator` drives an in-process `vllm.LLM`. `GeneratorProcess` runs one in a spawned child
and proxies every call over a pipe: the learner ranks already own a torch.distributed default group,
and an in-process vLLM would set up its own distributed state, change torch's thread count and
environment variables (vLLM-CPU rewrites LD_PRELOAD, LOCAL_WORLD_SIZE, ...) in the learner's process.
A child keeps both apart and gives vLLM's memory back when it exits.

Logprobs are vLLM's `raw_logprobs` (set explicitly on the engine): log_softmax of the raw logits, i.e.
temperature 1 and no top-p, whatever the sampling temperature. That is the quantity the learner
recomputes for the same tokens, so the refit check compares like with like.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from p2o_hpc.rollout.weight_sync import (
    WORKER_EXTENSION,
    Bucket,
    NcclWeightSender,
    WeightUpdateStats,
    checkpoint_weight_names,
    is_tied,
    push_weights,
)

log = logging.getLogger(__name__)

WeightTransfer = Literal["auto", "disk", "ipc", "nccl"]


@dataclass
class SamplingSettings:
    """Per-call sampling (paper defaults: T=0.6, top_p=1.0, n = K rollouts per prompt).

    seed: prompt i's k-th sample uses seed + i*n + k, so a call is reproducible while no two
    samples in it share a random stream (vLLM itself only offsets by k, so equal prompts in one
    batch would otherwise get equal samples).
    detokenize: off by default: the trainer decodes token ids itself, and detokenizing in vLLM costs
    CPU per token. When on, Completion.text holds vLLM's decoding.
    """

    n: int
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    logprobs: bool = True
    detokenize: bool = False


@dataclass
class Completion:
    """One sampled continuation. logprobs[t] is the raw log-probability of token_ids[t] (None if not asked).

    finish_reason: vLLM's, "stop" (EOS or a stop token) or "length" (max_tokens / max_model_len).
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    text: str = ""


class Generator(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSettings) -> list[list[Completion]]:
        """Per prompt, sampling.n completions, in prompt order."""
        ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, entry t = log p(token t | tokens < t); entry 0 is nan (nothing to condition on)."""
        ...

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Replace all weights with the learner's HF-named buckets (full tensors; tied lm_head may be absent)."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class GeneratorError(RuntimeError):
    """An error raised inside the generator child, re-raised in the parent with the child's traceback."""

    def __init__(self, message: str, child_type: str = "", child_traceback: str = ""):
        super().__init__(message)
        self.child_type = child_type
        self.child_traceback = child_traceback


class GeneratorDied(RuntimeError):
    """The generator child exited (crash, OOM kill, signal) or cannot be reached."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _sampling_params(sampling: SamplingSettings, num_prompts: int) -> Any:
    from vllm import SamplingParams

    common = dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        logprobs=0 if sampling.logprobs else None,
        flat_logprobs=True,  # constant number of Python objects per request instead of one dict per token
        detokenize=sampling.detokenize,
    )
    if sampling.seed is None:
        return SamplingParams(**common)
    return [SamplingParams(**common, seed=sampling.seed + i * sampling.n) for i in range(num_prompts)]


def _sampled_logprobs(flat: Any, token_ids: list[int]) -> list[float]:
    """Logprob of each sampled token from vLLM's FlatLogprobs (logprobs=0: one entry per position)."""
    out = []
    for position, token in enumerate(token_ids):
        start, end = flat.start_indices[position], flat.end_indices[position]
        for i in range(start, end):
            if flat.token_ids[i] == token:
                out.append(flat.logprobs[i])
                break
        else:
            raise RuntimeError(f"vLLM returned no logprob for sampled token {token} at position {position}")
    return out


class VLLMGenerator:
    """Generator backed by an in-process vllm.LLM (normally inside a GeneratorProcess child).

    dtype: vLLM's ("auto" = checkpoint dtype; tests use "float32" to compare with transformers).
    weight_transfer: "auto" = "disk" on CPU, "ipc" on GPU (learner on the same GPU, as in
    GeneratorProcess); "nccl" for vLLM on other GPUs (then call connect_nccl once). CPU-resident
    buckets always go by disk. enable_sleep_mode / sleep_level only matter on GPU; on CPU sleep() and
    wake() do nothing (vLLM-CPU has no sleep mode).
    On CPU, missing vllm_cpu_env() variables are set in os.environ before vLLM starts (vLLM reads them
    lazily), so in-process use on a small machine gets the 1 GiB KV cache and the in-process engine.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        tensor_parallel_size: int = 1,
        weight_transfer: WeightTransfer = "auto",
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        check_weight_names: bool = True,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        self.model_dir = _checked_model_dir(model_dir)
        self.device = "cuda" if _cuda_available() else "cpu"
        if self.device == "cpu":
            from p2o_hpc.rollout.vllm_env import vllm_cpu_env

            for key, value in vllm_cpu_env().items():
                os.environ.setdefault(key, value)
        if weight_transfer == "auto":
            weight_transfer = "ipc" if self.device == "cuda" else "disk"
        if self.device == "cpu" and weight_transfer != "disk":
            raise ValueError(f"weight_transfer={weight_transfer!r} needs a GPU; vLLM-CPU reloads from disk")
        self.weight_transfer: str = weight_transfer
        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_enabled = enable_sleep_mode and self.device == "cuda"
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        self._weights_discarded = False
        self._expected_names = checkpoint_weight_names(self.model_dir) if check_weight_names else None
        self._tied = is_tied(self.model_dir)
        self._nccl: NcclWeightSender | None = None
        self.last_update: WeightUpdateStats | None = None

        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=(self.device == "cpu") if enforce_eager is None else enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
        )
        if self.device == "cpu":
            # vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # split across engine steps: it rewinds the request's torch.Generator, which CPU generators
            # cannot do. Whole prefills only, with a token budget that fits the longest sequence.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if self.device == "cuda":
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
            if weight_transfer in ("ipc", "nccl"):
                kwargs["weight_transfer_config"] = {"backend": weight_transfer}
            if weight_transfer == "ipc":
                # IPC handles hold torch classes and dtypes, which vLLM's msgpack RPC to a multiprocess
                # engine core only carries with its pickle fallback.
                os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        kwargs.update(llm_kwargs or {})

        from vllm import LLM

        self._llm = LLM(**kwargs)
        if weight_transfer == "ipc":
            self.init_weight_transfer({"packed": False})

    # -- generation -------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSettings) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        if sampling.n < 1:
            raise ValueError(f"n must be >= 1, got {sampling.n}")
        if not prompt_token_ids:
            return []
        self._ensure_awake()
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self._llm.generate(prompts, _sampling_params(sampling, len(prompts)), use_tqdm=False)
        results = []
        for output in outputs:
            completions = []
            for sample in sorted(output.outputs, key=lambda s: s.index):
                token_ids = list(sample.token_ids)
                logprobs = _sampled_logprobs(sample.logprobs, token_ids) if sampling.logprobs else None
                completions.append(Completion(token_ids, logprobs, str(sample.finish_reason), sample.text or ""))
            results.append(completions)
        return results

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not sequences:
            return []
        if any(len(seq) == 0 for seq in sequences):
            raise ValueError("prompt_logprobs: every sequence needs at least one token")
        self._ensure_awake()
        # Requests with prompt_logprobs skip reading the prefix cache, so every position is recomputed.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=list(seq)) for seq in sequences], params, use_tqdm=False
        )
        results = []
        for seq, output in zip(sequences, outputs):
            flat = output.prompt_logprobs
            values = [math.nan]
            for position in range(1, len(seq)):
                start, end = flat.start_indices[position], flat.end_indices[position]
                hit = [flat.logprobs[i] for i in range(start, end) if flat.token_ids[i] == seq[position]]
                if not hit:
                    raise RuntimeError(f"vLLM returned no prompt logprob for position {position}")
                values.append(hit[0])
            results.append(values)
        return results

    # -- weights ----------------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        self.last_update = push_weights(
            buckets,
            self,
            method=self.weight_transfer,
            expected=self._expected_names,
            tied=self._tied,
            nccl=self._nccl,
        )
        log.info(
            "weights updated by %s: %d tensors, %.1f MB in %.2f s",
            self.last_update.method,
            self.last_update.num_tensors,
            self.last_update.num_bytes / 1e6,
            self.last_update.seconds,
        )

    def connect_nccl(self, master_address: str, master_port: int) -> None:
        """Join the NCCL weight-transfer group as its rank 0 (weight_transfer='nccl', GPU only)."""
        if self.weight_transfer != "nccl":
            raise RuntimeError("connect_nccl needs weight_transfer='nccl'")
        self._nccl = NcclWeightSender(master_address, master_port, world_size=1 + self.tensor_parallel_size)
        self._nccl.connect(self)

    # WeightReceiver: the receiving half, also called by GeneratorProcess from the parent.

    def load_weights_from_dir(self, weights_dir: str) -> None:
        self._before_update()
        self._llm.collective_rpc("p2o_load_weights_from_dir", args=(str(weights_dir),))
        self._after_update()

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        self._llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self._before_update()
        self._llm.collective_rpc("start_weight_update")

    def receive_weight_chunk(self, update_info: dict[str, Any]) -> None:
        self._llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self) -> None:
        self._llm.collective_rpc("finish_weight_update")
        self._llm.collective_rpc("p2o_refresh_tied_weights")
        self._after_update()

    def _before_update(self) -> None:
        self._wake_tags(["weights"])  # vLLM docs: wake weights, load, then wake the KV cache

    def _after_update(self) -> None:
        self._weights_discarded = False
        # Cached KV blocks were computed with the old weights; without this a repeated prompt prefix
        # would silently reuse them.
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")

    # -- memory -----------------------------------------------------------------------------------

    def sleep(self) -> None:
        """GPU with sleep mode: offload (level 1) or drop (level 2) weights and drop the KV cache."""
        if not self.sleep_enabled or self._asleep:
            return
        self._llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = self.sleep_level >= 2

    def wake(self) -> None:
        self._wake_tags(["weights", "kv_cache"])

    def _wake_tags(self, tags: list[str]) -> None:
        pending = [tag for tag in tags if tag in self._asleep]
        if not pending:
            return
        self._llm.wake_up(tags=pending)
        self._asleep.difference_update(pending)

    def _ensure_awake(self) -> None:
        if self._weights_discarded:
            raise RuntimeError("sleep level 2 discarded the weights: call update_weights before generating")
        self.wake()

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        if self._nccl is not None:
            self._nccl.close()
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the process may be exiting anyway
            log.debug("vLLM engine shutdown failed", exc_info=True)
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001
            log.debug("vLLM distributed teardown failed", exc_info=True)

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"generator model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"generator model folder {path} has no config.json")
    return path


# -- child process --------------------------------------------------------------------------------

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

_CHILD_METHODS = frozenset(
    {
        "generate",
        "prompt_logprobs",
        "load_weights_from_dir",
        "init_weight_transfer",
        "start_weight_update",
        "receive_weight_chunk",
        "finish_weight_update",
        "sleep",
        "wake",
    }
)


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
            if method not in _CHILD_METHODS:
                raise AttributeError(f"generator child has no method {method!r}")
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
    colocated layout: learner and vLLM share it, with sleep mode); pass env to choose otherwise.
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
        self.model_dir = _checked_model_dir(model_dir)
        self.call_timeout = call_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._death: str | None = None
        self._nccl: NcclWeightSender | None = None
        self.tensor_parallel_size = int(generator_kwargs.get("tensor_parallel_size", 1))
        self._expected_names = (
            checkpoint_weight_names(self.model_dir) if generator_kwargs.get("check_weight_names", True) else None
        )
        self._tied = is_tied(self.model_dir)

        child_env = dict(env or {})
        if _cuda_available():
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

    # -- Generator --------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSettings) -> list[list[Completion]]:
        return self._call("generate", [list(map(int, ids)) for ids in prompt_token_ids], sampling)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._call("prompt_logprobs", [list(map(int, seq)) for seq in sequences])

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
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

    def sleep(self) -> None:
        self._call("sleep")

    def wake(self) -> None:
        self._call("wake")

    # WeightReceiver, proxied.

    def load_weights_from_dir(self, weights_dir: str) -> None:
        self._call("load_weights_from_dir", weights_dir)

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        self._call("init_weight_transfer", init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def receive_weight_chunk(self, update_info: dict[str, Any]) -> None:
        self._call("receive_weight_chunk", update_info)

    def finish_weight_update(self) -> None:
        self._call("finish_weight_update")

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
            try:
                self._conn.send((method, args, kwargs))
            except (OSError, EOFError, BrokenPipeError) as error:
                raise self._died(method) from error
            return self._receive(method, self.call_timeout)

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


def _parent_physical_gpu() -> str:
    """The parent's current CUDA device as the child should see it (respecting CUDA_VISIBLE_DEVICES)."""
    import torch

    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[index].strip()
    return str(index)
