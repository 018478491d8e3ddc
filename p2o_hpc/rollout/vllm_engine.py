"""The generator interface on an in-process vllm.LLM, with in-place weight refresh.

Normally built inside a `generator_process.GeneratorProcess` child, which keeps vLLM's distributed
state, thread settings and environment out of the learner's process.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from p2o_hpc.rollout.generator import Completion, SamplingSettings
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


def cuda_available() -> bool:
    """Imports torch only when called: the generator child sets its environment before torch loads."""
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


def _tokens_prompt(token_ids: Iterable[int]) -> Any:
    """vLLM takes list[int]; callers may hold numpy or torch integers."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[int(token) for token in token_ids])


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
        self.model_dir = checked_model_dir(model_dir)
        self.device = "cuda" if cuda_available() else "cpu"
        if self.device == "cpu":
            from p2o_hpc.rollout.vllm_env import vllm_cpu_env

            for key, value in vllm_cpu_env().items():
                os.environ.setdefault(key, value)
        if weight_transfer == "auto":
            weight_transfer = "ipc" if self.device == "cuda" else "disk"
        if self.device == "cpu" and weight_transfer != "disk":
            raise ValueError(f"weight_transfer={weight_transfer!r} needs a GPU; vLLM-CPU reloads from disk")
        if weight_transfer == "ipc" and tensor_parallel_size > 1:
            # vLLM's ipc receiver looks up each tensor by its own GPU's UUID; the learner rank beside this engine
            # holds the weights on its one GPU only, so an engine over several GPUs would find no handle for the
            # others. Colocated engines are one per GPU (rollout.engines_per_node); a wider engine takes NCCL.
            raise ValueError(f"weight_transfer='ipc' feeds an engine on the learner's own GPU (tensor_parallel_size=1), "
                             f"not {tensor_parallel_size} GPUs: use weight_transfer='nccl' (or 'disk')")
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
        if sampling.n < 1:
            raise ValueError(f"n must be >= 1, got {sampling.n}")
        if not prompt_token_ids:
            return []
        self._ensure_awake()
        prompts = [_tokens_prompt(ids) for ids in prompt_token_ids]
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

        if not sequences:
            return []
        if any(len(seq) == 0 for seq in sequences):
            raise ValueError("prompt_logprobs: every sequence needs at least one token")
        self._ensure_awake()
        # Requests with prompt_logprobs skip reading the prefix cache, so every position is recomputed.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
        outputs = self._llm.generate([_tokens_prompt(seq) for seq in sequences], params, use_tqdm=False)
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

    # WeightReceiver: the receiving half, driven by push_weights here or through a GeneratorProcess.

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


def checked_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"generator model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"generator model folder {path} has no config.json")
    return path
