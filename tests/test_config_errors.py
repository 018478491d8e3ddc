"""Bad configurations fail before any process starts, with a message naming the offending key."""

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen3Config

from p2o_hpc.megatron.model_provider import read_hf_architecture
from p2o_hpc.config import AlgorithmConfig
from p2o_hpc.megatron.training import LRSchedule, build_learner, uses_torch_adamw_fallback


def test_unsupported_model_type_is_named():
    with pytest.raises(NotImplementedError, match="model_type 'mistral'"):
        read_hf_architecture(MistralConfig())


def test_rope_scaling_is_refused_not_silently_ignored():
    config = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(NotImplementedError, match="rope scaling"):
        read_hf_architecture(config)


def test_qwen3_reads_head_dim_and_rope_theta():
    arch = read_hf_architecture(Qwen3Config(hidden_size=256, num_attention_heads=4, head_dim=128, rope_theta=5e5))
    assert (arch.head_dim, arch.rope_theta, arch.qk_norm, arch.qkv_bias) == (128, 5e5, True, False)


def test_distributed_optimizer_on_adamw_fallback_is_refused():
    assert uses_torch_adamw_fallback()  # no TE/Apex on this machine
    arch = read_hf_architecture(Qwen3Config())
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        build_learner(arch, None, AlgorithmConfig(), LRSchedule(warmup_steps=0, total_steps=1),
                      use_distributed_optimizer=True)
