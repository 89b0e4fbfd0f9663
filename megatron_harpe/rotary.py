"""HarpeRotaryEmbedding: megatron-core's RoPE provider with one base per query group.

It keeps the contract of ``megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding``
(``forward(max_seq_len, offset=0, packed_seq=False, cp_group=None)`` and ``get_rotary_seq_len``). What
``forward`` returns depends on the RoPE path the provider is built with (``rope_impl``, fixed at construction):

* ``unfused``: the ``(query, key)`` frequency pair that megatron's ``Attention`` accepts as a tuple: queries
  ``[s, 1, heads_local, rot_dim]``, keys ``[s, 1, groups_local, rot_dim]`` for this tensor-parallel rank's heads,
  every query head using its group's base;
* ``auto`` / ``torch`` / ``triton`` (HARPE's kernels): ``(positions [s], inv_freq [groups_local, rot_dim/2])``,
  the same information without materializing ``s * heads * rot_dim`` frequencies, for
  :class:`~megatron_harpe.self_attention.HarpeSelfAttention` built with the same ``rope_impl``.

Both are a pair of tensors because that is what megatron carries through full activation recompute
(``megatron.core.recompute.checkpointed_forward`` saves each member with ``save_for_backward``).
With all bases equal the pair is megatron's ``RotaryEmbedding`` bit for bit (same float32 arithmetic, row for
row), ``get_cos_sin`` (flash decoding) included; with distinct bases ``get_cos_sin`` refuses, since its callers
apply one row to every head.

Unlike megatron's provider it never assumes CUDA: the inverse-frequency table is a non-persistent
buffer that follows the module's device, and context-parallel slicing is done here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_harpe.bases import validate_bases
from megatron_harpe.kernels.torch_rope import join_pairs
from megatron_harpe.positions import check_cp_divisible, cp_local_indices, packed_cp_group, rank_and_size

# How q and k are rotated: HARPE's kernels (auto = Triton on CUDA, torch elsewhere) or megatron's unfused RoPE with
# materialized per-head frequencies (for comparison). The provider and the attention are built with the same one.
ROPE_IMPLS = ("auto", "torch", "triton", "unfused")


def check_rope_impl(impl: str) -> str:
    if impl not in ROPE_IMPLS:
        raise ValueError(f"unknown HARPE RoPE implementation {impl!r}: choose one of {', '.join(ROPE_IMPLS)}")
    return impl


def rotary_dim(kv_channels: int, rotary_percent: float) -> int:
    """The rotated part of each head, as megatron computes it."""
    return int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels


def inverse_frequencies(bases: Sequence[float], dim: int, device=None) -> Tensor:
    """``[len(bases), dim // 2]`` float32 table; row ``g`` is exactly megatron's ``inv_freq`` for base ``g``."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return torch.stack([1.0 / (float(b) ** exponents) for b in bases])


def materialize_frequencies(positions: Tensor, inv_freq: Tensor, heads_per_group: int,
                            interleaved: bool) -> tuple[Tensor, Tensor]:
    """Megatron's ``(query [s,1,heads,dim], key [s,1,groups,dim])`` frequencies from positions and the table."""
    freqs = positions[:, None, None] * inv_freq[None, :, :]  # == torch.outer per group
    key_emb = join_pairs(freqs, freqs, interleaved)[:, None]  # megatron's cat / interleaved duplication
    if heads_per_group == 1:
        return key_emb, key_emb
    return key_emb.repeat_interleave(heads_per_group, dim=2), key_emb


def check_groups_divisible(num_query_groups: int, tp_size: int) -> None:
    """Each TP rank must hold whole query groups, so that it holds whole bases."""
    if num_query_groups % tp_size:
        raise ValueError(
            f"num_query_groups ({num_query_groups}) is not divisible by tensor_model_parallel_size "
            f"({tp_size}): each TP rank must hold whole query groups; choose a TP size that divides "
            f"{num_query_groups}"
        )


class HarpeRotaryEmbedding(nn.Module):
    """Rotary embedding with a per-query-group base (HARPE).

    Args:
        kv_channels: head dimension.
        rotary_percent: fraction of the head dimension that is rotated.
        bases: one RoPE base per query group, for the whole model (all TP ranks).
        num_attention_heads: query heads of the whole model.
        num_query_groups: query groups (KV heads); ``None`` means MHA (= num_attention_heads).
        rotary_interleaved: megatron's interleaved layout instead of rotate-half.
        seq_len_interpolation_factor: linear position interpolation (positions divided by it).
        tp_group / cp_group: process groups; ``None`` takes megatron's parallel_state groups if they
            exist, else size 1.
        device: where the frequency table lives (it follows ``module.to()`` afterwards).
        rope_impl: the RoPE path (:data:`ROPE_IMPLS`): ``unfused`` (the default, megatron's contract) returns
            megatron's frequency pair, HARPE's kernels get ``(positions, inv_freq)``.
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        bases: Sequence[float],
        num_attention_heads: int,
        num_query_groups: int | None = None,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: float | None = None,
        tp_group: torch.distributed.ProcessGroup | None = None,
        cp_group: torch.distributed.ProcessGroup | None = None,
        device=None,
        rope_impl: str = "unfused",
    ) -> None:
        super().__init__()
        self._rope_impl = check_rope_impl(rope_impl)
        num_query_groups = num_query_groups or num_attention_heads
        self.bases = validate_bases(bases, num_query_groups)
        if num_attention_heads % num_query_groups:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_query_groups "
                f"({num_query_groups})"
            )
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if cp_group is None:
            cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        tp_rank, tp_size = rank_and_size(tp_group)
        check_groups_divisible(num_query_groups, tp_size)
        self.cp_group = cp_group
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        self.dim = rotary_dim(kv_channels, rotary_percent)
        self.heads_per_group = num_attention_heads // num_query_groups
        groups_local = num_query_groups // tp_size
        self.local_bases = self.bases[tp_rank * groups_local : (tp_rank + 1) * groups_local]
        # [groups_local, dim/2]; non-persistent: derived from the bases, never checkpointed. The master is made on
        # the CPU explicitly so that a model built under torch.device('meta') (megatron's
        # --init-model-with-meta-device) keeps a real table instead of failing to copy a meta one.
        self._inv_freq_master = inverse_frequencies(self.local_bases, self.dim, device="cpu")
        self.register_buffer("inv_freq", self._inv_freq_master.to(device), persistent=False)

    @property
    def rope_impl(self) -> str:
        """The RoPE path this provider was built for (read-only: forward's return type depends on it)."""
        return self._rope_impl

    def _apply(self, fn, recurse=True):
        # Follow device moves, but stay float32: Float16Module / model.bfloat16() cast every floating
        # buffer, and RoPE angles must be computed in float32.
        result = super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq_master.to(self.inv_freq.device)
        return result

    def positions(self, max_seq_len: int, offset: int = 0, cp_rank: int = 0, cp_size: int = 1) -> Tensor:
        """float32 positions (after interpolation) for the tokens this CP rank holds, in local order."""
        index = cp_local_indices(max_seq_len, cp_rank, cp_size, device=self.inv_freq.device)
        seq = index.to(torch.float32) + offset
        if self.seq_len_interpolation_factor is not None:
            seq *= 1 / self.seq_len_interpolation_factor
        return seq

    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(query_emb [s,1,heads_local,dim], key_emb [s,1,groups_local,dim])`` on the ``unfused`` path,
        ``(positions [s], inv_freq [groups_local, dim/2])`` on HARPE's kernels.

        ``s`` is this CP rank's share of ``max_seq_len`` unless ``packed_seq`` (then all ``max_seq_len``
        positions, which megatron's THD RoPE slices per sequence).
        """
        cp_rank, cp_size = rank_and_size(cp_group if cp_group is not None else self.cp_group)
        if packed_seq:
            cp_rank, cp_size = 0, 1
        else:
            check_cp_divisible(max_seq_len, cp_size)
        return self._emb(max_seq_len, offset, cp_rank, cp_size, self.inv_freq.device)

    @lru_cache(maxsize=32)
    def _emb(self, max_seq_len: int, offset: int, cp_rank: int, cp_size: int, device):
        # device is part of the cache key so that a module moved after a call recomputes.
        seq = self.positions(max_seq_len, offset, cp_rank, cp_size)
        if self.rope_impl != "unfused":
            return seq, self.inv_freq
        return materialize_frequencies(seq, self.inv_freq, self.heads_per_group, self.rotary_interleaved)

    def get_cos_sin_per_group(self, max_seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``[max_seq_len, groups_local, dim / 2]`` (float32): each local group's own angles.

        Positions are ``offset .. offset + max_seq_len - 1`` (after interpolation), not split over context
        parallelism, as megatron's ``get_cos_sin`` does for decoding.
        """
        angles = self.positions(max_seq_len, offset)[:, None, None] * self.inv_freq[None, :, :]
        return torch.cos(angles), torch.sin(angles)

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """megatron's ``RotaryEmbedding.get_cos_sin``: ``cos, sin`` of shape ``[max_seq_len, dim / 2]``.

        Its callers (flash decoding, ``config.flash_decode`` / ``--flash-decode``, and FlashInfer's fused RoPE in
        dynamic inference) apply that one row per position to every head, which is HARPE only when all bases are
        equal; otherwise this refuses rather than rotate every head with one base.
        """
        if len(set(self.bases)) > 1:
            raise NotImplementedError(
                f"flash decoding (config.flash_decode / --flash-decode) and FlashInfer's fused RoPE "
                f"(use_flashinfer_fused_rope) apply one cos/sin row per position to every head, but this model has "
                f"{len(set(self.bases))} different HARPE bases: turn flash_decode (and use_flashinfer_fused_rope) off; "
                f"inference then takes megatron's unfused RoPE, which applies each head's frequencies"
            )
        cos, sin = self.get_cos_sin_per_group(max_seq_len, offset)
        return cos[:, 0], sin[:, 0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of megatron's RotaryEmbedding may carry inv_freq; ours is derived from the bases.
        state_dict.pop(f"{prefix}inv_freq", None)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, *, inference_params=None) -> int:
        """megatron's rule, except for packed THD batches on HARPE's kernels (``rope_impl`` other than ``unfused``).

        Megatron sizes the table of a packed batch by ``max_seqlen`` (unpadded). HARPE's kernels index
        the table with each token's position in its *padded* sequence (``cu_seqlens_q_padded``), which can
        reach past ``max_seqlen``; no position reaches past the whole pack, so the table covers that:
        the local rows x CP size (x TP size under sequence parallelism), all known from shapes, without a
        host sync. The unfused path keeps megatron's length: megatron's THD RoPE treats a table as long
        as the pack as one continuous sequence (positions not restarting per sequence).
        """
        length = RotaryEmbedding.get_rotary_seq_len(self, inference_context, transformer, transformer_input,
                                                    transformer_config, packed_seq_params,
                                                    inference_params=inference_params)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if self.rope_impl == "unfused" or not packed:
            return length
        has_input = transformer is not None and transformer.input_tensor is not None  # later pipeline stages
        rows = (transformer.input_tensor if has_input else transformer_input).size(0)
        if transformer_config.sequence_parallel:
            rows *= transformer_config.tensor_model_parallel_size
        _, cp_size = rank_and_size(packed_cp_group(packed_seq_params, self.cp_group))
        return max(length, rows * cp_size)
