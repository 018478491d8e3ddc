"""Core attention for megatron's local layer spec (CPU, or a GPU without Transformer-Engine) through torch's fused
``scaled_dot_product_attention``.

Megatron's local spec computes attention unfused (baddbmm → masked softmax → bmm, the whole [b, heads, s, s]
score tensor kept for backward) and refuses packed (THD) sequences. :class:`SDPAttention` is a drop-in
`core_attention` module (megatron's extension point: the layer spec names the class) that keeps
DotProductAttention's constructor, parameters and state dict and computes the same causal attention with SDPA
(flash/memory-efficient kernels: no score tensor). Packed sequences (``PackedSeqParams`` with qkv_format='thd',
as the learner packs them) run one SDPA call per sequence, so no token attends across a sequence boundary.
Anything SDPA would not reproduce exactly (an explicit mask, attention bias, sliding windows, softmax offsets,
query-key layer scaling, attention dropout in training) falls back to megatron's own forward. On GPUs with TE the
TE spec (TEDotProductAttention: cuDNN/flash) is used instead and this module is not involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class SDPAttention(DotProductAttention):
    """DotProductAttention computed by ``F.scaled_dot_product_attention`` (causal self-attention, bshd or thd)."""

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        self.fusable = (
            attn_mask_type == AttnMaskType.causal
            and config.softmax_type == "vanilla"
            and not config.apply_query_key_layer_scaling
            and not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        dropout = self.attention_dropout.p if self.training else 0.0
        if not self.fusable or attention_mask is not None or attention_bias is not None or dropout > 0:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if packed_seq_params is None:  # [s, b, heads, dim] -> [s, b, heads × dim]
            return self._causal(query, key, value)
        # THD: [tokens, heads, dim] with sequence boundaries at cu_seqlens -> [tokens, heads × dim]
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention: packed qkv_format {packed_seq_params.qkv_format!r}; only 'thd'")
        bounds = packed_seq_params.cu_seqlens_q_padded
        if bounds is None:
            bounds = packed_seq_params.cu_seqlens_q
        lengths = (bounds[1:] - bounds[:-1]).tolist()
        pieces = [self._causal(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
                  for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths))]
        return torch.cat(pieces)

    def _causal(self, query, key, value):
        """[s, b, heads, dim] (keys/values with their query groups) -> [s, b, heads × dim]."""
        seq, batch = query.shape[:2]
        query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))
        context = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=query.shape[1] != key.shape[1])
        return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)
