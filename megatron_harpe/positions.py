"""Which sequence positions a context-parallel rank holds, in Megatron's load-balanced layout.

Megatron splits a sequence into ``2 * cp`` equal chunks and gives rank ``r`` chunks ``r`` and
``2 * cp - 1 - r`` (so causal work is balanced). Packed (THD) batches are split the same way, sequence
by sequence, using the padded ``cu_seqlens``. RoPE positions and the causal mask must follow this
layout exactly; everything that needs it calls these functions.
"""

from __future__ import annotations

import torch


def check_cp_divisible(seq_len: int, cp_size: int, what: str = "sequence length") -> None:
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise ValueError(
            f"{what} {seq_len} is not divisible by 2 * context_parallel_size = {2 * cp_size}: context "
            f"parallelism splits every sequence into 2*CP chunks; pad the sequence to a multiple of "
            f"{2 * cp_size} or change --context-parallel-size"
        )


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


def packed_local_coordinates(
    cu_seqlens_padded: torch.Tensor, cp_rank: int, cp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token a CP rank holds of a packed (THD) batch: ``(sequence id, position in sequence)``.

    ``cu_seqlens_padded`` are the cumulative *full* (pre-CP-split) padded lengths, as in
    ``PackedSeqParams.cu_seqlens_q_padded`` (or ``cu_seqlens_q`` when no padding is used).
    """
    bounds = [int(x) for x in cu_seqlens_padded.tolist()]
    seq_ids, positions = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        length = end - start
        check_cp_divisible(length, cp_size, what=f"packed sequence {i} length")
        local = cp_local_indices(length, cp_rank, cp_size)
        positions.append(local)
        seq_ids.append(torch.full_like(local, i))
    device = cu_seqlens_padded.device
    return torch.cat(seq_ids).to(device), torch.cat(positions).to(device)
