"""HarpeSelfAttention: megatron's SelfAttention applying per-head RoPE itself.

Transformer Engine's fused RoPE (``apply_rope_fusion``) and fused QKV+RoPE (``fused_single_qkv_rope``)
read one frequency row per position, shared by all heads: given HARPE's per-head frequencies they are
silently wrong. And megatron's unfused RoPE, which broadcasts per-head frequencies correctly, saves
``cos``/``sin`` of shape ``[s, 1, h, d]`` for backward in every layer. So this attention (swapped in
through the layer spec) rotates q and k itself, right after the QKV projection, with
:func:`megatron_harpe.kernels.harpe_rope_qk`, which saves only the positions and the frequency table.

What it does follows the ``rotary_pos_emb`` it is called with:

* a Tensor (megatron's own ``RotaryEmbedding``: standard RoPE, one base) - megatron's unfused path, so a
  plain ``GPTModel`` built with ``harpe_layer_spec`` is megatron's model;
* a pair, the output of :class:`~megatron_harpe.rotary.HarpeRotaryEmbedding` - read as the provider's
  ``rope_impl`` says, which is also this attention's ``rope_impl`` (a constructor argument: the model puts it in
  the layer spec's ``ModuleSpec.params``, one value for the provider and every layer):
  ``auto`` (Triton on CUDA, torch elsewhere, the default), ``torch`` or ``triton`` - ``(positions, inv_freq)``
  for that kernel; ``unfused`` - megatron's ``(query, key)`` frequencies for its own unfused path (for comparison).

The path is not carried in the pair's type because megatron's full activation recompute
(``megatron.core.recompute.checkpointed_forward``) hands the layers a plain tuple of the saved tensors.

Whatever the config says, at construction or at forward time, fused RoPE is never used here. Inference (a KV cache)
always takes megatron's unfused path, which slices the frequencies to the cache position. Layers that
``config.no_rope_freq`` marks get no RoPE on any path, as in megatron's ``Attention``.

Packed (THD) batches: each token takes its position inside its own padded sequence (and CP chunk),
computed on the device once per micro-batch (:func:`~megatron_harpe.positions.cached_packed_local_coordinates`)
over ``packed_seq_params.cp_group`` when it is set, else the attention's CP group.
"""

from __future__ import annotations

import copy

from torch import Tensor

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.kernels import harpe_rope_qk
from megatron_harpe.positions import cached_packed_local_coordinates, packed_cp_group, rank_and_size
from megatron_harpe.rotary import check_rope_impl, materialize_frequencies


def without_rope_fusion(config: TransformerConfig) -> TransformerConfig:
    """``config`` itself if no fused RoPE is asked for, else a shallow copy with both fusions off."""
    if not (config.apply_rope_fusion or config.fused_single_qkv_rope):
        return config
    config = copy.copy(config)
    config.apply_rope_fusion = False
    config.fused_single_qkv_rope = False
    return config


class HarpeSelfAttention(SelfAttention):
    """Self-attention for per-head (per-query-group) RoPE; ``rope_impl`` as the provider that feeds it was built."""

    def __init__(self, config: TransformerConfig, *args, rope_impl: str = "auto", **kwargs):
        super().__init__(without_rope_fusion(config), *args, **kwargs)
        self.rope_impl = check_rope_impl(rope_impl)
        self._pending_rope: tuple | None = None

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, packed_seq_params=None, inference_params=None, **kwargs):
        inference_context = inference_context if inference_context is not None else inference_params
        if self._skips_rope():
            # megatron's Attention.forward drops it too, but only after the capture below.
            rotary_pos_emb = None
        if isinstance(rotary_pos_emb, tuple) and self.rope_impl != "unfused":
            positions, inv_freq = self._kernel_inputs(rotary_pos_emb)
            if inference_context is not None:
                heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
                rotary_pos_emb = materialize_frequencies(positions, inv_freq, heads_per_group,
                                                         self.config.rotary_interleaved)
            else:
                # Applied in get_query_key_value_tensors, which super().forward calls once, right below.
                self._pending_rope = (positions, inv_freq, packed_seq_params)
                rotary_pos_emb = None
        # megatron reads config.apply_rope_fusion / fused_single_qkv_rope at forward time, so a flag switched on
        # after construction would hand per-head frequencies to TE's fused RoPE: forward sees them off, always.
        config, self.config = self.config, without_rope_fusion(self.config)
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._pending_rope = None
            self.config = config

    def _kernel_inputs(self, rotary_pos_emb: tuple) -> tuple[Tensor, Tensor]:
        positions, inv_freq = rotary_pos_emb
        if positions.dim() != 1 or inv_freq.dim() != 2:
            raise ValueError(
                f"layer {self.layer_number}'s HarpeSelfAttention was built for HARPE's kernels "
                f"(rope_impl={self.rope_impl!r}) and expects (positions [s], inv_freq [groups, d/2]) from "
                f"HarpeRotaryEmbedding(rope_impl={self.rope_impl!r}); it got tensors of shapes "
                f"{tuple(positions.shape)} and {tuple(inv_freq.shape)} (megatron's frequency pair?): build the "
                f"provider and the attention with the same rope_impl, as HarpeGPTModel(harpe_rope_impl=...) does")
        return positions, inv_freq

    def _skips_rope(self) -> bool:
        """megatron's test: ``no_rope_freq`` is 0-indexed per layer, ``layer_number`` 1-indexed."""
        return bool(self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1])

    def _packed_positions(self, positions: Tensor, packed_seq_params, rows: int) -> Tensor:
        """Each packed token's position in its own padded sequence: the provider's table indexed per token."""
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = cu if cu is not None else packed_seq_params.cu_seqlens_q
        cp_rank, cp_size = rank_and_size(packed_cp_group(packed_seq_params, self.pg_collection.cp))
        _, within = cached_packed_local_coordinates(cu, cp_rank, cp_size, rows)
        return positions[within.to(positions.device)]

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self._pending_rope is None:
            return out
        positions, inv_freq, packed_seq_params = self._pending_rope
        self._pending_rope = None
        query, key, *rest = out
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # The provider gives positions 0..pack length-1; each packed sequence starts again at 0.
            positions = self._packed_positions(positions, packed_seq_params, query.size(0))
        if positions.numel() != query.size(0):
            raise ValueError(f"HARPE RoPE got {positions.numel()} positions for {query.size(0)} query rows")
        query, key = harpe_rope_qk(query, key, positions, inv_freq, self.config.rotary_interleaved, impl=self.rope_impl)
        return (query, key, *rest)
