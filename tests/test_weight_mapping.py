"""The single HF<->Megatron mapping: splits invert exactly, QKV is grouped per KV head, names cover both specs."""

import pytest
import torch

from p2o_hpc.megatron.model_provider import HFArchitecture
from p2o_hpc.megatron.weight_mapping import Split, mapping_for, merge_shards, shard_for_rank, to_local_spec_name

ARCH = HFArchitecture(
    model_type="qwen3", vocab_size=300, hidden_size=16, ffn_hidden_size=24, num_layers=2, num_attention_heads=8,
    num_kv_heads=4, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, qk_norm=True,
    qkv_bias=False, max_position_embeddings=64, initializer_range=0.02,
)


def _hf_tensors(split: Split) -> list[torch.Tensor]:
    h, f, d = ARCH.hidden_size, ARCH.ffn_hidden_size, ARCH.head_dim
    shapes = {
        Split.REPLICATED: [(h,)],
        Split.VOCAB: [(ARCH.vocab_size, h)],
        Split.COLUMN: [(f, h)],
        Split.ROW: [(h, f)],
        Split.QKV: [(ARCH.num_attention_heads * d, h), (ARCH.num_kv_heads * d, h), (ARCH.num_kv_heads * d, h)],
        Split.GATE_UP: [(f, h), (f, h)],
    }[split]
    return [torch.randn(shape) for shape in shapes]


@pytest.mark.parametrize("split", list(Split))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_merge_back_exactly(split, tp):
    full = _hf_tensors(split)
    shards = [shard_for_rank(full, split, ARCH, rank, tp) for rank in range(tp)]
    merged = merge_shards(shards, split, ARCH)
    assert len(merged) == len(full)
    for a, b in zip(merged, full):
        assert torch.equal(a, b)


def test_qkv_is_fused_per_kv_group_and_whole_groups_go_to_a_rank():
    d, groups = ARCH.head_dim, ARCH.num_kv_heads
    q_rows = ARCH.num_attention_heads // groups * d
    q = torch.arange(ARCH.num_attention_heads * d).float()[:, None].expand(-1, 2) + 1000
    k = torch.arange(groups * d).float()[:, None].expand(-1, 2) + 2000
    v = torch.arange(groups * d).float()[:, None].expand(-1, 2) + 3000
    fused = shard_for_rank([q, k, v], Split.QKV, ARCH, 0, 1)
    block = q_rows + 2 * d
    for g in range(groups):
        rows = fused[g * block : (g + 1) * block, 0]
        assert torch.equal(rows[:q_rows], q[g * q_rows : (g + 1) * q_rows, 0])
        assert torch.equal(rows[q_rows : q_rows + d], k[g * d : (g + 1) * d, 0])
        assert torch.equal(rows[q_rows + d :], v[g * d : (g + 1) * d, 0])
    # A naive [q; k; v] concat is a different tensor: the classic conversion bug this layout avoids.
    assert not torch.equal(fused, torch.cat([q, k, v]))
    rank1 = shard_for_rank([q, k, v], Split.QKV, ARCH, 1, 2)
    assert torch.equal(rank1, fused[groups // 2 * block :])


def test_gate_up_rank_holds_its_gate_then_its_up():
    gate, up = torch.arange(24.0)[:, None], -torch.arange(24.0)[:, None]
    shard = shard_for_rank([gate, up], Split.GATE_UP, ARCH, 1, 2)
    assert torch.equal(shard, torch.cat([gate[12:], up[12:]]))


def test_vocab_is_padded_for_tp_and_trimmed_on_merge():
    emb = torch.randn(ARCH.vocab_size, ARCH.hidden_size)
    shards = [shard_for_rank([emb], Split.VOCAB, ARCH, r, 2) for r in range(2)]
    assert sum(s.shape[0] for s in shards) == ARCH.padded_vocab_size(2) == 512
    assert torch.count_nonzero(shards[1][ARCH.vocab_size - 256 :]) == 0
    assert torch.equal(merge_shards(shards, Split.VOCAB, ARCH)[0], emb)


def test_layer_names_use_global_hf_index_and_te_names_map_to_local():
    local = mapping_for("decoder.layers.1.mlp.linear_fc1.weight", ARCH, layer_offset=2)
    assert local.hf_names == ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    te = mapping_for("module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", ARCH)
    assert te.hf_names == ("model.layers.0.input_layernorm.weight",)
    assert to_local_spec_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.0.pre_mlp_layernorm.weight"


def test_tied_output_layer_reads_the_embedding():
    import dataclasses

    tied = dataclasses.replace(ARCH, tie_word_embeddings=True)
    assert mapping_for("output_layer.weight", tied).hf_names == ("model.embed_tokens.weight",)
    assert mapping_for("output_layer.weight", ARCH).hf_names == ("lm_head.weight",)


def test_unmapped_parameter_is_an_error_naming_it():
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        mapping_for("decoder.layers.0.mlp.router.weight", ARCH)
