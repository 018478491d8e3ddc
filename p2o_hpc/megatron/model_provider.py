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
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from p2o_hpc.choices import Recompute
from p2o_hpc.megatron import cpu_compat
from p2o_hpc.megatron.sdpa_attention import SDPAttention

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


def recompute_settings(recompute: Recompute | str, num_layers: int, layers_per_stage: int) -> dict:
    """parallel.recompute as megatron's TransformerConfig fields (full: `num_layers` layers per uniform chunk)."""
    recompute = Recompute(recompute)
    if recompute == Recompute.none:
        return {}
    if recompute == Recompute.selective:
        return dict(recompute_granularity="selective")  # recompute_modules defaults to core attention
    if not 1 <= num_layers <= layers_per_stage:
        raise ValueError(f"parallel.recompute_num_layers={num_layers} must be in [1, {layers_per_stage}] (the "
                         "layers of one pipeline stage: num_hidden_layers / parallel.pipeline)")
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=num_layers)


def build_transformer_config(
    arch: HFArchitecture,
    params_dtype: torch.dtype = torch.float32,
    *,
    sequence_parallel: bool = False,
    recompute: Recompute | str = Recompute.none,
    recompute_num_layers: int = 1,
    **overrides,
) -> TransformerConfig:
    """Parallel sizes come from parallel_state, which must be initialised first. `sequence_parallel` and
    `recompute*` are parallel.*'s memory keys (p2o_hpc.config.ParallelConfig)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if sequence_parallel or Recompute(recompute) != Recompute.none:
        cpu_compat.run_backward_under_device_mode()
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
        sequence_parallel=sequence_parallel,
        **recompute_settings(recompute, recompute_num_layers, arch.num_layers // pp),
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local spec (no TE/Apex: CPU) under sequence parallelism. Megatron's torch norm
    refuses SP only because it leaves the weight unmarked: marked, finalize_model_grads sums its gradient (from
    each rank's share of the sequence) over the TP ranks, as TE's norm is."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_module(spec, old: type, new: type):
    """The layer spec with every `old` module class replaced by `new` (megatron builds what the spec names)."""
    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=new if spec.module is old else spec.module,
                                   submodules=_with_module(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _with_module(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


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
    spec = spec_fn(**spec_kwargs)
    if not use_te:  # the local spec's unfused attention -> torch's fused SDPA (the same values: sdpa_attention)
        spec = _with_module(spec, DotProductAttention, SDPAttention)
    if config.sequence_parallel and not use_te:
        spec = TransformerBlockSubmodules(
            layer_specs=[_with_module(spec, WrappedTorchNorm, SequenceParallelRMSNorm)]
            * get_num_layers_to_build(config, vp_stage),
            layer_norm=SequenceParallelRMSNorm,
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
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
    if config.sequence_parallel:
        pad_sequences_for_sequence_parallel(model, tp)
    # Megatron's own layers are made on the current device, but the local spec's torch norms on the host (megatron's
    # training script moves the model the same way). On CPU the compat layer makes this a no-op.
    model.cuda(torch.cuda.current_device())
    return model


def pad_sequences_for_sequence_parallel(model: GPTModel, tp: int) -> None:
    """Sequence parallelism splits the sequence evenly over the TP ranks, but RL micro-batches are padded only to
    their own longest sequence. The first stage's input_ids get right-padded to a multiple of TP (causal attention:
    trailing tokens change nothing before them) and the last stage's logits are cut back to the caller's length,
    so callers never see the padding. (The output layer all-gathers the sequence: logits are whole sequences.)"""

    def pad_input(module, args, kwargs):
        input_ids, *rest = args
        module._unpadded_length = input_ids.shape[1]
        extra = -input_ids.shape[1] % tp
        if extra and module.pre_process:
            input_ids = F.pad(input_ids, (0, extra), value=0)
        return (input_ids, *rest), kwargs

    def cut_output(module, args, kwargs, output):
        if module.post_process and torch.is_tensor(output) and output.dim() == 3 and kwargs.get("labels") is None:
            return output[:, : module._unpadded_length]
        return output

    model.register_forward_pre_hook(pad_input, with_kwargs=True)
    model.register_forward_hook(cut_output, with_kwargs=True)
