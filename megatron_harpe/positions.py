"""Which sequence positions a context-parallel rank holds, in Megatron's load-balanced layout.

Megatron splits a sequence into ``2 * cp`` equal chunks and gives rank ``r`` chunks ``r`` and
``2 * cp - 1 - r`` (so causal work is balanced). Packed (THD) batches are split the same way, sequence
by sequence, using the padded ``cu_seqlens``. RoPE positions and the causal mask must follow this
layout exactly; everything that needs it calls these functions.

Packed coordinates are computed with tensor ops on ``cu_seqlens``' device: nothing is read back to the
host when ``cu_seqlens`` lives on a GPU (bad boundaries fail a device-side assert there; on the CPU, where
reading costs nothing, they raise a ValueError that says what to fix). Every attention layer of a
micro-batch (and activation recompute) needs the same coordinates; :func:`cached_packed_local_coordinates`
computes them once per ``cu_seqlens`` tensor.
"""

from __future__ import annotations

import weakref

import torch


def check_cp_divisible(seq_len: int, cp_size: int, what: str = "sequence length") -> None:
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise ValueError(
            f"{what} {seq_len} is not divisible by 2 * context_parallel_size = {2 * cp_size}: context "
            f"parallelism splits every sequence into 2*CP chunks; pad the sequence to a multiple of "
            f"{2 * cp_size} or change --context-parallel-size"
        )


def rank_and_size(group) -> tuple[int, int]:
    """``(rank, size)`` of a process group; ``None`` is a group of one."""
    if group is None:
        return 0, 1
    return group.rank(), group.size()


def packed_cp_group(packed_seq_params, default):
    """The CP group a packed batch is split over, decided as ``TEDotProductAttention`` decides it.

    megatron's dynamic (hybrid) CP sets ``packed_seq_params.cp_group`` per micro-batch; ``local_cp_size``
    without a group turns CP off for the micro-batch; otherwise the attention's own group applies.
    """
    if packed_seq_params is not None:
        if packed_seq_params.cp_group is not None:
            return packed_seq_params.cp_group
        if packed_seq_params.local_cp_size is not None:
            return None
    return default


def cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices rank ``cp_rank`` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def cp_local_indices(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Positions (0-based, into the full sequence) that ``cp_rank`` holds, in its local order."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    check_cp_divisible(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in cp_chunk_ids(cp_rank, cp_size)])


def _check_packed_lengths(bounds: torch.Tensor, cp_size: int) -> None:
    """``bounds`` = cu_seqlens plus the end of the batch's rows. A clear error on the CPU, a device assert elsewhere."""
    lengths = bounds[1:] - bounds[:-1]
    sequences = lengths[:-1]  # the last is trailing padding: any non-negative length
    if bounds.device.type == "cpu":  # reading a CPU tensor costs no device synchronisation
        for i, length in enumerate(sequences.tolist()):
            if length < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing: packed sequence {i} has length {length}")
            check_cp_divisible(length, cp_size, what=f"packed sequence {i} length")
        if lengths[-1] < 0:
            raise ValueError(f"cu_seqlens ends at token {int(bounds[-2])} but the batch holds {int(bounds[-1])} "
                             f"tokens ({int(bounds[-1]) // cp_size} rows on each of {cp_size} CP ranks)")
        return
    # Asynchronous: a bad batch fails at a later kernel launch instead of giving wrong positions.
    valid = (lengths >= 0).all()
    if cp_size > 1:
        valid = valid & (sequences % (2 * cp_size) == 0).all()
    torch._assert_async(valid, f"packed cu_seqlens must be non-decreasing, end within the batch and have lengths "
                               f"divisible by 2 * context_parallel_size = {2 * cp_size}")


def packed_local_coordinates(
    cu_seqlens_padded: torch.Tensor, cp_rank: int, cp_size: int, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token a CP rank holds of a packed (THD) batch: ``(sequence id, position in sequence)``.

    ``cu_seqlens_padded`` are the cumulative *full* (pre-CP-split) padded lengths, as in
    ``PackedSeqParams.cu_seqlens_q_padded`` (or ``cu_seqlens_q`` when no padding is used).
    ``num_tokens`` is the number of rows this rank holds (``t`` of its ``[t, h, d]``); callers on the
    training path pass it so that nothing is read back from the device. ``None`` reads ``cu[-1] / cp``.
    Rows past ``cu[-1] / cp`` (trailing padding) count as one more sequence, as megatron's ``seq_idx`` does.
    """
    cu = cu_seqlens_padded.long()
    if num_tokens is None:
        num_tokens = int(cu[-1]) // cp_size
    # [0, cu_1, ..., cu_n, everything]: the last boundary covers trailing padding rows, so no index overflows.
    bounds = torch.cat([cu, cu.new_full((1,), num_tokens * cp_size)])
    _check_packed_lengths(bounds, cp_size)
    token = torch.arange(num_tokens, device=cu.device)
    local_bounds = bounds // cp_size  # each rank holds 1/cp of every (divisible) sequence
    seq_id = torch.searchsorted(local_bounds[1:], token, right=True)  # right: empty sequences hold no token
    within = token - local_bounds[seq_id]
    if cp_size == 1:
        return seq_id, within
    # Local rows [0, chunk) are chunk cp_rank, [chunk, 2 chunk) are chunk 2cp-1-cp_rank (megatron's layout).
    chunk = (bounds[1:] - bounds[:-1])[seq_id] // (2 * cp_size)
    return seq_id, within + chunk * torch.where(within < chunk, cp_rank, 2 * cp_size - 2 - cp_rank)


class _PackedCoordinatesMemo:
    """The coordinates of the last packed batch seen, by CP rank/size and row count.

    Keyed by the identity of the ``cu_seqlens`` tensor (a weak reference, so a freed tensor whose id
    is reused cannot hit) and its in-place version counter; any change is a miss, which only recomputes.
    """

    def __init__(self) -> None:
        self._cu: weakref.ref | None = None
        self._version = -1
        self._entries: dict = {}

    def get(self, cu: torch.Tensor, cp_rank: int, cp_size: int, num_tokens: int):
        if cu.is_inference():  # inference tensors have no version counter: never cache them
            return packed_local_coordinates(cu, cp_rank, cp_size, num_tokens)
        if self._cu is None or self._cu() is not cu or self._version != cu._version:
            self._cu, self._version, self._entries = weakref.ref(cu), cu._version, {}
        key = (cp_rank, cp_size, num_tokens, torch.is_inference_mode_enabled())
        if key not in self._entries:
            self._entries[key] = packed_local_coordinates(cu, cp_rank, cp_size, num_tokens)
        return self._entries[key]


_MEMO = _PackedCoordinatesMemo()


def cached_packed_local_coordinates(cu_seqlens_padded: torch.Tensor, cp_rank: int, cp_size: int,
                                    num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`packed_local_coordinates`, computed once per micro-batch for all layers. Do not modify the result."""
    return _MEMO.get(cu_seqlens_padded, cp_rank, cp_size, num_tokens)
