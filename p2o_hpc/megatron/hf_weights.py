"""Move weights between HF safetensors folders and a TP/PP-sharded megatron GPTModel.

Import streams tensor by tensor (a rank reads only the HF tensors its stage needs, and for plain row/column/vocab
splits only its own slice), so a multi-GB checkpoint is never materialised whole on one rank. Export yields
``(hf_name, full_tensor)`` pairs in size-bounded buckets, gathered over TP and collected over PP, identically on
every rank that receives (each rank says whether it does): vLLM weight sync and the Megatron→HF export tool both
consume it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import unwrap_model
from safetensors import safe_open

from p2o_hpc.megatron.model_provider import HFArchitecture
from p2o_hpc.megatron.weight_mapping import (
    ParamMapping,
    Split,
    is_exported,
    mapping_for,
    merge_shards,
    shard_for_rank,
)

DEFAULT_BUCKET_BYTES = 512 * 1024**2


def parameter_mappings(model, arch: HFArchitecture) -> list[tuple[torch.nn.Parameter, ParamMapping]]:
    """Every parameter of this rank's stage with its rule; an unmapped parameter is an error, never skipped."""
    module = unwrap_model(model)
    layer_offset = get_transformer_layer_offset(module.config)
    return [(param, mapping_for(name, arch, layer_offset)) for name, param in module.named_parameters()]


class SafetensorsFolder:
    """Read-only view of an HF weights folder (one file or sharded with model.safetensors.index.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{self.folder}: neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, framework="pt") as handle:
                weight_map = {name: single.name for name in handle.keys()}
        self.weight_map: dict[str, str] = weight_map
        self._files = ExitStack()
        self._handles: dict[str, object] = {}

    def _handle(self, hf_name: str):
        if hf_name not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {hf_name!r} is not in the checkpoint")
        file_name = self.weight_map[hf_name]
        if file_name not in self._handles:
            self._handles[file_name] = self._files.enter_context(safe_open(self.folder / file_name, framework="pt"))
        return self._handles[file_name]

    def tensor(self, hf_name: str) -> torch.Tensor:
        return self._handle(hf_name).get_tensor(hf_name)

    def header(self, hf_name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "BF16") from the file header; no tensor data is read."""
        view = self._handle(hf_name).get_slice(hf_name)
        return tuple(view.get_shape()), view.get_dtype()

    def dim_slice(self, hf_name: str, dim: int, part: int, parts: int) -> torch.Tensor:
        """Only rows (dim 0) or columns (dim 1) `part` of `parts` are read from disk."""
        view = self._handle(hf_name).get_slice(hf_name)
        size = view.get_shape()[dim]
        if size % parts:
            raise ValueError(f"{self.folder}: {hf_name} dim {dim} = {size} is not divisible by {parts} TP ranks")
        step = size // parts
        index = [slice(None)] * len(view.get_shape())
        index[dim] = slice(part * step, (part + 1) * step)
        return view[tuple(index)]

    def close(self) -> None:
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_shard(source: SafetensorsFolder, mapping: ParamMapping, arch: HFArchitecture, tp_rank: int, tp_size: int) -> torch.Tensor:
    if mapping.split is Split.COLUMN:
        return source.dim_slice(mapping.hf_names[0], 0, tp_rank, tp_size)
    if mapping.split is Split.ROW:
        return source.dim_slice(mapping.hf_names[0], 1, tp_rank, tp_size)
    if mapping.split is Split.VOCAB and arch.padded_vocab_size(tp_size) == arch.vocab_size:
        return source.dim_slice(mapping.hf_names[0], 0, tp_rank, tp_size)
    return shard_for_rank([source.tensor(name) for name in mapping.hf_names], mapping.split, arch, tp_rank, tp_size)


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | Path, arch: HFArchitecture) -> None:
    """Fill this rank's parameters from an HF folder, one tensor at a time."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with SafetensorsFolder(hf_dir) as source:
        for param, mapping in parameter_mappings(model, arch):
            shard = _read_shard(source, mapping, arch, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(
                    f"{hf_dir}: {mapping.hf_names} give a shard of shape {tuple(shard.shape)} for "
                    f"{mapping.megatron_name} of shape {tuple(param.shape)} (TP rank {tp_rank}/{tp_size})"
                )
            param.copy_(shard)


def _gather_full_tensors(param: torch.Tensor, mapping: ParamMapping, arch: HFArchitecture) -> list[torch.Tensor]:
    if mapping.split is Split.REPLICATED:
        return [param.detach()]
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shards = [param.detach()]
    if tp_size > 1:
        shards = [torch.empty_like(param) for _ in range(tp_size)]
        dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return merge_shards(shards, mapping.split, arch)


def _stage_tensors(model, arch: HFArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    for param, mapping in parameter_mappings(model, arch):
        if is_exported(mapping, arch):
            yield from zip(mapping.hf_names, _gather_full_tensors(param, mapping, arch))


def _all_stage_tensors(model, arch: HFArchitecture, receive: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's tensors in stage order on the ranks that `receive`, nothing on the others; every rank must
    drive it to the end (the TP gathers and the PP headers are collective). The owner stage sends each tensor
    point-to-point to the receiving ranks of its PP group only, so a rank without an engine gets no copy."""
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        for name, tensor in _stage_tensors(model, arch):
            if receive:
                yield name, tensor
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    receives = [None] * pp_size
    dist.all_gather_object(receives, receive, group=pp_group)
    for stage in range(pp_size):
        owner = pp_ranks[stage]
        local = _stage_tensors(model, arch) if stage == pp_rank else None
        while True:
            header = [None]
            if local is not None:
                item = next(local, None)
                header = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(header, src=owner, group=pp_group)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            if local is not None:
                tensor = item[1].contiguous()
                for peer, wants in zip(pp_ranks, receives):
                    if wants and peer != owner:
                        dist.send(tensor, dst=peer, group=pp_group)
            elif receive:
                tensor = torch.empty(shape, dtype=dtype, device=torch.cuda.current_device())  # NCCL: device only
                dist.recv(tensor, src=owner, group=pp_group)
            if receive:
                yield name, tensor


def export_hf_weights(model, arch: HFArchitecture, bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                      receive: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (hf_name, tensor), each at most `bucket_bytes` unless one tensor alone is larger, on the ranks
    that `receive` (per rank: those that hand the weights on, e.g. host an engine); the others get no buckets.

    Collective: every rank of the model-parallel group must iterate it to the end, in step.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in _all_stage_tensors(model, arch, receive):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def copy_model_files(source_dir: str | Path, dest: str | Path) -> None:
    """Everything of an HF folder but its weights (config, generation config, tokenizer, chat template, …), for a
    folder whose weights are written anew; an export's COMPLETE marker is not carried over either."""
    import shutil

    for item in Path(source_dir).iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                "model.safetensors.index.json", "COMPLETE"):
            shutil.copy2(item, Path(dest) / item.name)


def save_hf_folder(model, arch: HFArchitecture, source_dir: str | Path, out_dir: str | Path, *, write: bool,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Path:
    """The learner's current weights as a Hugging Face folder (config, tokenizer and chat template copied from
    `source_dir`), for the GEPA service's engine and for evaluation. Collective, like export_hf_weights; only the
    rank with `write` receives the weights and writes. The folder appears whole (staged next to it, then renamed)
    or not at all.
    """
    import json
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.tmp"
    if write:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for index, bucket in enumerate(export_hf_weights(model, arch, bucket_bytes, receive=write)):
        if write:
            file_name = f"model-{index:05d}.safetensors"
            save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in bucket},
                      str(staging / file_name), metadata={"format": "pt"})
            (staging / file_name).chmod(0o644)  # safetensors writes 0600; other users' jobs read these folders
            weight_map.update({name: file_name for name, _ in bucket})
    if write:
        copy_model_files(source_dir, staging)
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    return out_dir
