"""The one HF ↔ Megatron parameter mapping: names, and how each tensor is split over tensor-parallel ranks.

Everything that moves weights (checkpoint import, vLLM weight sync, Megatron→HF export) asks this module.
A mapping is a rule per Megatron parameter name (local layer spec names; Transformer-Engine names are rewritten
to them first) giving the HF tensors it is made of and a :class:`Split` kind that says how to cut the full HF
tensor(s) into a TP shard (:func:`shard_for_rank`) and how to put gathered shards back (:func:`merge_shards`).
"""

from __future__ import annotations

import dataclasses
import enum
import re

import torch

from p2o_hpc.megatron.model_provider import HFArchitecture


class Split(enum.Enum):
    REPLICATED = "replicated"  # norms: every TP rank holds the whole tensor
    VOCAB = "vocab"  # embedding / lm head rows, padded to the Megatron vocab size, split on dim 0
    COLUMN = "column"  # ColumnParallelLinear: output features split on dim 0
    ROW = "row"  # RowParallelLinear: input features split on dim 1
    QKV = "qkv"  # q, k, v fused per KV group: [q_g (heads/groups × d), k_g (d), v_g (d)] for each group
    GATE_UP = "gate_up"  # SwiGLU fc1: each TP rank holds [gate_r; up_r]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    megatron_name: str  # as in the model's named_parameters() on the local spec
    hf_names: tuple[str, ...]
    split: Split


# Transformer-Engine fuses the pre-attention / pre-MLP norms into the following linear layers.
_TE_TO_LOCAL_NAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
)


def to_local_spec_name(name: str) -> str:
    """`module.` wrappers (DDP, Float16Module) and TE's fused-norm names both map to the local-spec name."""
    while name.startswith("module."):
        name = name[len("module.") :]
    for te_name, local_name in _TE_TO_LOCAL_NAMES:
        if name.endswith(te_name):
            return name[: -len(te_name)] + local_name
    return name


_LAYER_RULES: tuple[tuple[str, tuple[str, ...], Split], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), Split.REPLICATED),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Split.QKV),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), Split.QKV),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), Split.REPLICATED),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), Split.REPLICATED),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), Split.ROW),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), Split.REPLICATED),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Split.GATE_UP),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), Split.ROW),
)
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def mapping_for(megatron_name: str, arch: HFArchitecture, layer_offset: int = 0) -> ParamMapping:
    """The rule for one Megatron parameter; `layer_offset` turns a stage-local layer index into the HF one."""
    name = to_local_spec_name(megatron_name)
    if name == "embedding.word_embeddings.weight":
        return ParamMapping(name, ("model.embed_tokens.weight",), Split.VOCAB)
    if name == "decoder.final_layernorm.weight":
        return ParamMapping(name, ("model.norm.weight",), Split.REPLICATED)
    if name == "output_layer.weight":
        # Tied models (Qwen3-4B) keep the embedding on the last PP stage as output_layer; HF stores it once.
        source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return ParamMapping(name, (source,), Split.VOCAB)
    match = _LAYER_NAME.match(name)
    if match:
        local_index, suffix = int(match.group(1)), match.group(2)
        hf_layer = f"model.layers.{local_index + layer_offset}."
        for megatron_suffix, hf_suffixes, split in _LAYER_RULES:
            if suffix == megatron_suffix:
                return ParamMapping(name, tuple(hf_layer + s for s in hf_suffixes), split)
    raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r} ({arch.model_type})")


def is_exported(mapping: ParamMapping, arch: HFArchitecture) -> bool:
    """A tied output layer is a copy of the embedding: HF checkpoints and vLLM take it once."""
    return not (mapping.megatron_name == "output_layer.weight" and arch.tie_word_embeddings)


def _qkv_group_sizes(arch: HFArchitecture) -> tuple[int, int]:
    heads_per_group = arch.num_attention_heads // arch.num_kv_heads
    return heads_per_group * arch.head_dim, arch.head_dim


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: HFArchitecture) -> torch.Tensor:
    """[q; k; v] (HF) → per-group [q_g, k_g, v_g] (Megatron), for weights [rows, hidden] and biases [rows]."""
    q_rows, kv_rows = _qkv_group_sizes(arch)
    groups = arch.num_kv_heads
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, q_rows, *tail), k.reshape(groups, kv_rows, *tail), v.reshape(groups, kv_rows, *tail)], dim=1
    )
    return fused.reshape(-1, *tail)


def _unfuse_qkv(fused: torch.Tensor, arch: HFArchitecture) -> list[torch.Tensor]:
    q_rows, kv_rows = _qkv_group_sizes(arch)
    tail = fused.shape[1:]
    grouped = fused.reshape(arch.num_kv_heads, q_rows + 2 * kv_rows, *tail)
    q, k, v = grouped.split([q_rows, kv_rows, kv_rows], dim=1)
    return [t.reshape(-1, *tail) for t in (q, k, v)]


def shard_for_rank(hf_tensors: list[torch.Tensor], split: Split, arch: HFArchitecture, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Full HF tensor(s) → this TP rank's Megatron shard."""
    if split is Split.REPLICATED:
        return hf_tensors[0]
    if split is Split.VOCAB:
        full = hf_tensors[0]
        padded_rows = arch.padded_vocab_size(tp_size)
        if full.shape[0] < padded_rows:
            full = torch.cat([full, full.new_zeros(padded_rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp_size, dim=0)[tp_rank]
    if split is Split.COLUMN:
        return hf_tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if split is Split.ROW:
        return hf_tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if split is Split.QKV:
        # Whole KV groups go to a rank, so splitting the fused tensor on dim 0 is the TP split.
        return _fuse_qkv(*hf_tensors, arch).chunk(tp_size, dim=0)[tp_rank]
    if split is Split.GATE_UP:
        gate, up = hf_tensors
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise AssertionError(split)


def merge_shards(shards: list[torch.Tensor], split: Split, arch: HFArchitecture) -> list[torch.Tensor]:
    """All TP ranks' shards (in rank order) → the full HF tensor(s), in the order of ParamMapping.hf_names."""
    if split is Split.REPLICATED:
        return [shards[0]]
    if split is Split.VOCAB:
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    if split is Split.COLUMN:
        return [torch.cat(shards, dim=0)]
    if split is Split.ROW:
        return [torch.cat(shards, dim=1)]
    if split is Split.QKV:
        return _unfuse_qkv(torch.cat(shards, dim=0), arch)
    if split is Split.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise AssertionError(split)
