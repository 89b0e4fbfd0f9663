"""HarpeSelfAttention: megatron's SelfAttention, kept away from fused RoPE kernels that share one base.

Transformer Engine's fused RoPE (``apply_rope_fusion``) and fused QKV+RoPE (``fused_single_qkv_rope``)
read one frequency row per position, shared by all heads: given HARPE's per-head ``[s, 1, h, d]``
frequencies they are silently wrong. This module is swapped in through the layer spec; it always takes
megatron's unfused RoPE, which broadcasts per-head frequencies correctly, whatever the config says.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig


def without_rope_fusion(config: TransformerConfig) -> TransformerConfig:
    """``config`` itself if no fused RoPE is asked for, else a shallow copy with both fusions off."""
    if not (config.apply_rope_fusion or config.fused_single_qkv_rope):
        return config
    config = copy.copy(config)
    config.apply_rope_fusion = False
    config.fused_single_qkv_rope = False
    return config


class HarpeSelfAttention(SelfAttention):
    """Self-attention for per-head (per-query-group) RoPE frequencies."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(without_rope_fusion(config), *args, **kwargs)
