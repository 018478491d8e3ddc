"""Build a megatron-core GPTModel (one pipeline stage of it) that computes exactly what an HF causal LM computes.

The HF config is read once into :class:`HFArchitecture`, the single description both the provider and the
weight mapping (:mod:`p2o_hpc.megatron.weight_mapping`) work from. Qwen3 is the reference; Qwen2 (qkv bias,
no q/k norm) and Llama (neither) are the same dense decoder and map cleanly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """What megatron needs to know about an HF dense decoder; read from config.json by :func:`read_hf_architecture`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    max_position_embeddings: int
    initializer_range: float

    def padded_vocab_size(self, tp_size: int, divisible_by: int = 128) -> int:
        """Megatron splits the vocabulary evenly over TP ranks; extra rows are zero and masked out of log-probs."""
        multiple = divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if rope_type != "default" or (legacy_scaling and legacy_scaling.get("rope_type", "default") != "default"):
        raise NotImplementedError(
            f"config.json: rope scaling {params or legacy_scaling} is not supported by the Megatron provider yet "
            "(only plain RoPE, as in Qwen3/Qwen2/Llama-2)"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise KeyError("config.json: no rope_theta (neither rope_parameters['rope_theta'] nor rope_theta)")
    return float(theta)


def read_hf_architecture(hf_config_or_dir) -> HFArchitecture:
    """Accepts a transformers config object or a model folder; unsupported architectures fail with the reason."""
    if isinstance(hf_config_or_dir, (str, Path)):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(hf_config_or_dir)
    else:
        hf_config = hf_config_or_dir
    model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"config.json: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"config.json: hidden_act {hf_config.hidden_act!r}; only silu (SwiGLU) is supported")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return HFArchitecture(
        model_type=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        qkv_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
        max_position_embeddings=hf_config.max_position_embeddings,
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
    )


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def build_transformer_config(arch: HFArchitecture, params_dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """Parallel sizes come from parallel_state, which must be initialised first."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    settings = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=False,  # HF's rotate_half layout; interleaved is a different model
        attention_softmax_in_fp32=True,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # True is required: with False, megatron skips marking TP attributes and the grad norm counts one shard.
        perform_initialization=True,
        # RL micro-batches differ in length; PP then exchanges shapes first. (The dispatcher key is MoE-only,
        # but megatron rejects variable lengths with its allgather default.)
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_gpt_model(
    arch: HFArchitecture,
    config: TransformerConfig,
    *,
    use_te: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """The GPTModel for this rank's pipeline stage (embedding on the first, output layer on the last)."""
    if use_te is None:
        use_te = transformer_engine_available()
    spec_fn = get_gpt_layer_with_transformer_engine_spec if use_te else get_gpt_layer_local_spec
    spec_kwargs = dict(qk_layernorm=arch.qk_norm)
    if not use_te:
        spec_kwargs["normalization"] = "RMSNorm"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec_fn(**spec_kwargs),
        vocab_size=arch.padded_vocab_size(tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
    return model
