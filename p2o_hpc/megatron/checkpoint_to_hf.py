"""A learner checkpoint (megatron dist_checkpointing, any TP/PP/DP layout) → a checked Hugging Face folder, in one
process: no torch.distributed world, no GPU, no learner.

Why this works without the layout: megatron saves every parameter as its *global* tensor (TP shards placed at
their offsets, the layers of a stage stacked on a leading axis at their global index), so the files written by
2×2 ranks describe the same tensors as those written by one. They are read with torch.distributed.checkpoint's
own reader (``no_dist``) one layer slice at a time; each slice is the full Megatron tensor of one layer, which the
learner's mapping (:func:`weight_mapping.merge_shards`, given that tensor as the only shard) turns into HF
tensors: the same code path the vLLM weight sync and the in-run export use. Peak memory is one layer's largest
tensor plus one output shard (``max_shard_bytes``).

Nothing is declared done unchecked: the output is staged beside ``out_dir``, and ``COMPLETE`` (JSON: source,
step, base model, dtype, parameter count) is written only after every HF key of the base model is present with
its shape and the chosen dtype, no key is extra and the parameter counts agree; then the folder is renamed into
place. A checkpoint without megatron's ``COMPLETE`` marker (a job killed mid-save), with missing files, or made
from another base model is refused with what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from p2o_hpc.megatron.checkpointing import COMPLETE_MARKER, checkpoint_step, complete_checkpoints
from p2o_hpc.megatron.hf_weights import SafetensorsFolder, copy_model_files
from p2o_hpc.megatron.model_provider import HFArchitecture, read_hf_architecture
from p2o_hpc.megatron.weight_mapping import is_exported, mapping_for, merge_shards

EXPORT_MARKER = "COMPLETE"  # in the HF folder: JSON describing what was converted and checked
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default ("5GB")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_LAYER_KEY = "decoder.layers."


class CheckpointConversionError(ValueError):
    """The checkpoint cannot become a correct HF folder: incomplete, another base model, or a failed check."""


@dataclass(frozen=True)
class ConversionStats:
    """What `convert_checkpoint` measured: bytes written, seconds from the first read to the renamed folder, and
    the resident-memory peak of this process (imports included)."""

    out_dir: Path
    parameters: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    skipped: bool  # the folder was already complete for this checkpoint

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run dir's complete checkpoints, oldest first (half-written ones are never listed)."""
    return complete_checkpoints(Path(run_dir) / "checkpoints")


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/checkpoints/step_N`` → ``<run>/hf/step_N`` (RunDir.hf_export: beside the checkpoints, same storage)."""
    from p2o_hpc.run_dir import RunDir

    checkpoint = Path(checkpoint).resolve()
    step = checkpoint_step(checkpoint)
    if step is None:
        raise CheckpointConversionError(f"{checkpoint}: not a checkpoints/step_<N> folder; give an out dir")
    return RunDir(checkpoint.parent.parent).hf_export(step)


def base_model_of(checkpoint: str | Path) -> str:
    """The HF folder the run started from: model.path of the run's config.yaml (two levels above step_N)."""
    from p2o_hpc.model_dir import resolve_model_dir
    from p2o_hpc.run_dir import RunDir

    run = RunDir(Path(checkpoint).resolve().parent.parent)
    if not run.config.is_file():
        raise CheckpointConversionError(
            f"{checkpoint}: no run config at {run.config} to tell the base model; pass --base-model <HF folder>")
    return resolve_model_dir(run.load_config().model.path)


# ---------------------------------------------------------------------------------------------- reading


def _checkpoint_metadata(checkpoint: Path):
    """DCP metadata of a complete checkpoint whose every data file is present; refusals say why."""
    from torch.distributed.checkpoint import FileSystemReader

    if not checkpoint.is_dir():
        raise CheckpointConversionError(f"{checkpoint}: no such checkpoint folder")
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise CheckpointConversionError(
            f"{checkpoint}: incomplete checkpoint (no {COMPLETE_MARKER} marker: the save was interrupted); "
            "convert an earlier complete one (--run <run dir> picks the latest complete)")
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointConversionError(f"{checkpoint}: no .metadata file: not a megatron torch_dist checkpoint")
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    missing = sorted({info.relative_path for info in metadata.storage_data.values()
                      if not (checkpoint / info.relative_path).is_file()})
    if missing:
        raise CheckpointConversionError(f"{checkpoint}: data files missing: {', '.join(missing)}")
    return metadata


def _model_tensors(metadata) -> dict[str, object]:
    """Model parameters only (no optimizer state, no TE/FP8 ``_extra_state`` blobs)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: item for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata) and not key.startswith("optimizer.")
            and "_extra_state" not in key}


class _Reader:
    """torch.distributed.checkpoint's file reader on one checkpoint, its metadata parsed once (a large run's
    .metadata lists every optimizer shard too), reading regions of global tensors without a process group."""

    def __init__(self, checkpoint: Path, metadata):
        from torch.distributed.checkpoint import FileSystemReader

        class CachedReader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                return metadata

        self.checkpoint, self.metadata = checkpoint, metadata
        self.storage = CachedReader(str(checkpoint))

    def read(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """key → (offsets, sizes) of its global tensor ⇒ key → that region, in the saved dtype."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        metadata = self.metadata

        class RegionPlanner(DefaultLoadPlanner):
            """Reads only the saved chunks that overlap each requested region (DCP's own overlap arithmetic)."""

            def create_local_plan(self) -> LoadPlan:
                items = []
                for key, (offsets, sizes) in regions.items():
                    region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                    items += create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [region])
                return LoadPlan(items)

            def lookup_tensor(self, index):
                return self.state_dict[index.fqn]

        out = {key: torch.empty(sizes, dtype=metadata.state_dict_metadata[key].properties.dtype)
               for key, (_, sizes) in regions.items()}
        with warnings.catch_warnings():  # "torch.distributed is disabled … assuming a single process": the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=self.storage, planner=RegionPlanner(), no_dist=True)
        return out


def _megatron_tensors(checkpoint: Path, metadata, arch: HFArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron parameter name with its global layer index, full tensor): the non-layer tensors one by one, then
    every layer's tensors in one read per layer."""
    reader = _Reader(checkpoint, metadata)
    tensors = {key: tuple(item.size) for key, item in _model_tensors(metadata).items()}
    layered = {key: shape for key, shape in tensors.items() if key.startswith(_LAYER_KEY)}
    for key, shape in tensors.items():
        if key not in layered:
            yield key, reader.read({key: ((0,) * len(shape), shape)})[key]
    for key, shape in layered.items():
        if shape[0] != arch.num_layers:
            raise CheckpointConversionError(
                f"{checkpoint}: {key} holds {shape[0]} layers, the base model has {arch.num_layers}: "
                "the checkpoint was made from another base model")
    for layer in range(arch.num_layers if layered else 0):
        regions = {key: ((layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:]) for key, shape in layered.items()}
        for key, region in reader.read(regions).items():
            yield f"{_LAYER_KEY}{layer}.{key[len(_LAYER_KEY):]}", region[0]


def hf_tensors(checkpoint: str | Path, arch: HFArchitecture, metadata=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every exported parameter of a complete checkpoint, streamed (`metadata`: its DCP
    metadata when the caller has read it already)."""
    checkpoint = Path(checkpoint)
    metadata = metadata or _checkpoint_metadata(checkpoint)
    for name, tensor in _megatron_tensors(checkpoint, metadata, arch):
        try:
            mapping = mapping_for(name, arch)
        except KeyError as error:
            raise CheckpointConversionError(f"{checkpoint}: {error.args[0]}") from None
        if not is_exported(mapping, arch):
            continue
        try:
            full = merge_shards([tensor], mapping.split, arch)
        except RuntimeError as error:  # a reshape that cannot hold: the shapes are another model's
            raise CheckpointConversionError(
                f"{checkpoint}: {name} of shape {tuple(tensor.shape)} does not fit the base model "
                f"({arch.model_type}, hidden {arch.hidden_size}): {error}") from None
        yield from zip(mapping.hf_names, full)


# ---------------------------------------------------------------------------------------------- the base model


def _base_weights(base_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF name → (shape, dtype) of the base model, from the safetensors headers (no tensor is read)."""
    try:
        with SafetensorsFolder(base_dir) as folder:
            return {name: (shape, _SAFETENSORS_DTYPES[dtype])
                    for name, (shape, dtype) in ((name, folder.header(name)) for name in folder.weight_map)}
    except FileNotFoundError as error:  # no weights file, or one the index names is missing
        raise CheckpointConversionError(f"base model {base_dir}: {error}") from None


def _config_dtype(base_dir: Path) -> torch.dtype | None:
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name).replace("torch.", "")) if name else None


def _copy_model_files(base_dir: Path, staging: Path, dtype: torch.dtype) -> None:
    """config, generation config, tokenizer and chat template of the base model; config.json's dtype set to ours."""
    copy_model_files(base_dir, staging)
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    dtype_name = str(dtype).replace("torch.", "")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    config.update({key: dtype_name for key in keys})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if not (staging / "generation_config.json").exists():
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(staging)


# ---------------------------------------------------------------------------------------------- writing


def _peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark. Linux's VmHWM belongs to the process image; getrusage's
    ru_maxrss survives exec, so a converter started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _check_against_base(written: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        base: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype,
                        checkpoint: Path, base_dir: Path) -> int:
    """Every base key present with its shape and our dtype, nothing extra, equal parameter count; returns it."""
    problems = []
    missing, extra = sorted(set(base) - set(written)), sorted(set(written) - set(base))
    if missing:
        problems.append(f"{len(missing)} base keys missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} keys the base model does not have (e.g. {', '.join(extra[:3])})")
    for name in sorted(set(base) & set(written)):
        if written[name][0] != base[name][0]:
            problems.append(f"{name}: shape {written[name][0]} vs the base model's {base[name][0]}")
        if written[name][1] != dtype:
            problems.append(f"{name}: dtype {written[name][1]} vs {dtype}")
    count = sum(_numel(shape) for shape, _ in written.values())
    base_count = sum(_numel(shape) for shape, _ in base.values())
    if count != base_count:
        problems.append(f"{count:,} parameters vs the base model's {base_count:,}")
    if problems:
        raise CheckpointConversionError(f"{checkpoint} does not convert to a model like {base_dir}: "
                                        + "; ".join(problems[:8]))
    return count


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _already_converted(out_dir: Path, checkpoint: Path, dtype: torch.dtype) -> dict | None:
    marker = out_dir / EXPORT_MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return None
    same = done.get("checkpoint") == str(checkpoint) and done.get("dtype") == str(dtype).replace("torch.", "")
    return done if same else None


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path | None = None, *, base_model_dir: str | None = None,
                       dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       progress=None) -> ConversionStats:
    """``checkpoints/step_N`` → an HF folder (default ``<run>/hf/step_N``), checked, then marked ``COMPLETE``.

    `base_model_dir`: the HF folder whose architecture, tokenizer and key set the export must match (default: the
    run's model.path). `dtype`: bf16 / fp16 / fp32 (default: the base model's config dtype, else the saved one).
    An existing complete export of the same checkpoint and dtype is kept as it is. `progress(done, total)` is
    called after each tensor.
    """
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint).resolve()
    metadata = _checkpoint_metadata(checkpoint)
    base_dir = Path(base_model_dir or base_model_of(checkpoint)).resolve()
    if not (base_dir / "config.json").is_file():
        raise CheckpointConversionError(f"base model {base_dir}: no config.json (not a Hugging Face model folder)")
    arch = read_hf_architecture(base_dir)
    base = _base_weights(base_dir)
    saved_dtype = next(iter(_model_tensors(metadata).values())).properties.dtype
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointConversionError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else (_config_dtype(base_dir) or saved_dtype)
    out_dir = Path(out_dir).resolve() if out_dir else default_out_dir(checkpoint)
    done = _already_converted(out_dir, checkpoint, target)
    if done is not None:
        return ConversionStats(out_dir, done["parameters"], 0, 0.0, _peak_rss_bytes(), True)

    start = time.perf_counter()  # reading, converting, checking and writing; not the imports and config reads above
    staging = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        written: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, files, total_bytes = 0, [], 0

        def flush() -> None:
            nonlocal shard, shard_bytes
            file_name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(staging / file_name), metadata={"format": "pt"})
            (staging / file_name).chmod(0o644)  # safetensors writes 0600; other users' jobs read these folders
            files.append((file_name, list(shard)))
            shard, shard_bytes = {}, 0

        total = len(base)
        for name, tensor in hf_tensors(checkpoint, arch, metadata):
            if name in written:
                raise CheckpointConversionError(f"{checkpoint}: {name} produced twice")
            tensor = tensor.to(target).contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
            shard[name] = tensor
            shard_bytes += nbytes
            total_bytes += nbytes
            written[name] = (tuple(tensor.shape), tensor.dtype)
            if progress is not None:
                progress(len(written), total)
        if shard:
            flush()
        parameters = _check_against_base(written, base, target, checkpoint, base_dir)

        weight_map = {}
        for number, (file_name, names) in enumerate(files, start=1):
            final_name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            os.replace(staging / file_name, staging / final_name)
            weight_map.update({name: final_name for name in names})
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        _copy_model_files(base_dir, staging, target)
        (staging / EXPORT_MARKER).write_text(json.dumps({
            "checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint),
            "base_model": str(base_dir), "dtype": str(target).replace("torch.", ""), "parameters": parameters,
            "bytes": total_bytes}, indent=1) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionStats(out_dir, parameters, total_bytes, time.perf_counter() - start, _peak_rss_bytes(), False)
