"""A core attention for megatron-core that runs anywhere: torch SDPA, GQA, packed THD, context parallel.

megatron-core's local ``DotProductAttention`` allocates from a CUDA buffer, refuses packed sequences
and context parallelism, and Transformer Engine needs a GPU. This module takes the same constructor
and ``forward`` contract so the local layer spec runs HARPE models on a CPU under every kind of
parallelism Megatron uses. Under context parallelism K and V are all-gathered over the CP group (the
micro-batch's ``packed_seq_params.cp_group`` when it brings one, as with Transformer Engine) and put back
in sequence order; the mask is built from the true positions of Megatron's load-balanced layout
(:mod:`megatron_harpe.positions`) by :func:`allowed_keys`, a function of the shapes, the mask type, the CP
rank and size and the user's mask alone. It is a reference path: memory grows with
``s_local * s``, which is fine for tests and small CPU runs. On GPUs use the TE spec.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_harpe.positions import cached_packed_local_coordinates, cp_local_indices, packed_cp_group, rank_and_size

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradients and keeps this rank's part.

    Written with all_gather/all_reduce because gloo has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.group.size(), dim=0)[ctx.group.rank()], None


def _coordinates(length: int, packed: Tensor | None, cp_rank: int, cp_size: int, device):
    """(sequence id, index in the full sequence or packed batch) of the tokens a CP rank holds.

    ``length`` is the full sequence length (unpacked); ``packed`` the padded cu_seqlens (THD).
    """
    if packed is None:
        index = cp_local_indices(length, cp_rank, cp_size, device=device)
        return torch.zeros_like(index), index
    seq_id, pos = cached_packed_local_coordinates(packed, cp_rank, cp_size, length // cp_size)
    # seq_id may be len(packed) - 1 for trailing padding rows: packed[-1] is where they start.
    return seq_id, pos + packed.to(pos.device)[seq_id]


def allowed_keys(s_q: int, s_k: int, causal: bool, *, packed: Tensor | None = None, cp_rank: int = 0,
                 cp_size: int = 1, attention_mask: Tensor | None = None,
                 device=None) -> tuple[Tensor | None, Tensor | None]:
    """Which keys each query may attend to: ``(allowed, key_order)``.

    ``s_k`` counts the keys of the whole sequence (all CP ranks' shares, gathered rank by rank), ``s_q`` this
    rank's queries; ``packed`` is the padded cu_seqlens of a THD batch. ``allowed`` is boolean ``[1 or b, 1, s_q,
    s_k]`` (True = may attend) over the keys in sequence order: same sequence, not later if ``causal``, and not
    masked by ``attention_mask`` (True = masked, megatron's convention). ``key_order`` puts the gathered keys in
    sequence order (``None``: they already are). ``(None, None)`` when SDPA's own ``is_causal`` says it all.
    """
    if not (cp_size > 1 or packed is not None or attention_mask is not None or not causal or s_q != s_k):
        return None, None

    def coordinates(rank):
        return _coordinates(s_k, packed, rank, cp_size, device)

    k_seq, k_idx = (torch.cat(parts) for parts in zip(*(coordinates(r) for r in range(cp_size))))
    if cp_size > 1 or packed is not None:
        q_seq, q_idx = coordinates(cp_rank)
    else:
        # Queries are the last s_q positions (s_q < s_k: decoding against a KV cache).
        q_seq, q_idx = k_seq[s_k - s_q :], k_idx[s_k - s_q :]
    order = None
    if cp_size > 1:
        # The gathered keys in sequence order, so that a user mask indexes them naturally.
        order = torch.argsort(k_idx)
        k_seq, k_idx = k_seq[order], k_idx[order]
    allowed = q_seq[:, None] == k_seq[None, :]
    if causal:
        allowed = allowed & (q_idx[:, None] >= k_idx[None, :])
    allowed = allowed[None, None]  # [1, 1, s_q, s_k]
    if attention_mask is not None:
        allowed = allowed & ~attention_mask.to(torch.bool)
    return allowed, order


class SDPAttention(MegatronModule):
    """Drop-in core attention (``submodules.core_attention``) on ``torch.nn.functional.scaled_dot_product_attention``.

    ``attention_mask=None`` with a causal mask type means causal, as with Transformer Engine; a given
    mask (True = masked, megatron's convention, ``[b, 1, s_q, s_k]``) is applied on top.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.window_size is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention; use the TE spec")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        tp_size = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        packed = _packed_boundaries(packed_seq_params, attention_mask)
        if packed is not None:
            # [t, h, d] -> [t, 1, h, d]: the packed batch is one row.
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)

        cp_group = packed_cp_group(packed_seq_params, self.cp_group)  # megatron's dynamic CP, as TE's attention
        cp_rank, cp_size = rank_and_size(cp_group)
        if cp_size > 1:
            key = _GatherSequence.apply(key, cp_group)
            value = _GatherSequence.apply(value, cp_group)

        causal = mask_type in _CAUSAL_TYPES
        allowed, key_order = allowed_keys(query.size(0), key.size(0), causal, packed=packed, cp_rank=cp_rank,
                                          cp_size=cp_size, attention_mask=attention_mask, device=query.device)
        if key_order is not None:
            key, value = key[key_order], value[key_order]

        out = self._attend(query, key, value, allowed, causal)  # [s_q, b, h * d]
        return out.squeeze(1) if packed is not None else out

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None, causal: bool) -> Tensor:
        """torch SDPA on megatron's ``[s, b, heads, d]`` layout, ``[s_q, b, heads * d]`` out."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if (dropout_p and q.is_cuda) else nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=allowed,
                dropout_p=dropout_p,
                is_causal=allowed is None and causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_heads != self.num_groups,
            )
        out = out.permute(2, 0, 1, 3)  # [s_q, b, h, d]
        return out.reshape(out.size(0), out.size(1), -1)


def _packed_boundaries(packed_seq_params: PackedSeqParams | None, attention_mask: Tensor | None) -> Tensor | None:
    """The padded cu_seqlens of a THD batch (``None`` for ``[s, b, ...]`` batches)."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if attention_mask is not None:
        raise ValueError("packed (THD) sequences take their boundaries from cu_seqlens, not attention_mask")
    packed = packed_seq_params.cu_seqlens_q_padded
    return packed if packed is not None else packed_seq_params.cu_seqlens_q
