"""Our context-parallel layout against megatron-core's own slicing code and per-sequence Python."""

import itertools

import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank, get_pos_emb_on_this_cp_rank
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.positions import (cached_packed_local_coordinates, cp_local_indices, packed_cp_group,
                                      packed_local_coordinates, rank_and_size)
from test_rotary import FakeGroup


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_local_indices_match_megatron(cp_size):
    full = torch.arange(48)
    for rank in range(cp_size):
        with megatron_on_cpu():
            expected = full if cp_size == 1 else get_pos_emb_on_this_cp_rank(full, 0, FakeGroup(rank, cp_size))
        assert torch.equal(cp_local_indices(48, rank, cp_size), expected)


def test_packed_coordinates_match_megatron_thd_slicing():
    cu = torch.tensor([0, 8, 12, 24])
    for cp_size in (1, 2):
        for rank in range(cp_size):
            seq_id, pos = packed_local_coordinates(cu, rank, cp_size)
            expected = torch.cat([
                _get_thd_freqs_on_this_cp_rank(rank, cp_size, torch.empty(n // cp_size), torch.arange(n))
                for n in (8, 4, 12)
            ])
            assert torch.equal(pos, expected)
            assert torch.equal(seq_id, torch.repeat_interleave(torch.arange(3), torch.tensor([8, 4, 12]) // cp_size))


def test_indivisible_lengths_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 4"):
        cp_local_indices(18, 0, 2)
    with pytest.raises(ValueError, match="packed sequence 1 length 6"):
        packed_local_coordinates(torch.tensor([0, 8, 14]), 0, 2)


# ----------------------------------------------------------------------------------------------------------
# Packed (THD) coordinates: vectorized, against positions written out sequence by sequence.


def expected_packed(padded_lengths, cp_rank, cp_size, trailing=0):
    """(sequence id, position) per local token, spelled out: chunks r and 2cp-1-r of every padded sequence."""
    seq_ids, positions = [], []
    for i, n in enumerate(padded_lengths + ([trailing] if trailing else [])):
        if cp_size == 1:
            local = list(range(n))
        else:
            chunk = n // (2 * cp_size)
            first, second = cp_rank, 2 * cp_size - 1 - cp_rank
            local = list(range(first * chunk, (first + 1) * chunk)) + list(range(second * chunk, (second + 1) * chunk))
        seq_ids += [i] * len(local)
        positions += local
    return seq_ids, positions


def cu_of(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# Padded lengths (multiples of 2*CP, as cu_seqlens_q_padded), an empty sequence, a long last one.
PADDED = [8, 16, 0, 24, 8]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_packed_positions_equal_per_sequence_python(cp_size):
    for rank in range(cp_size):
        seq_id, pos = packed_local_coordinates(cu_of(PADDED), rank, cp_size, num_tokens=sum(PADDED) // cp_size)
        want_seq, want_pos = expected_packed(PADDED, rank, cp_size)
        assert seq_id.tolist() == want_seq and pos.tolist() == want_pos
        assert pos.dtype == torch.int64


def test_rows_past_the_last_sequence_are_one_more_sequence():
    # A batch padded past cu_seqlens[-1] (megatron's seq_idx counts those rows as one more sequence).
    seq_id, pos = packed_local_coordinates(cu_of([8, 4]), 1, 2, num_tokens=10)
    want_seq, want_pos = expected_packed([8, 4], 1, 2, trailing=8)
    assert seq_id.tolist() == want_seq and pos.tolist() == want_pos


def test_packed_positions_read_nothing_back_from_the_device():
    # On a GPU, .tolist() / .item() / int() of cu_seqlens would each synchronise with the host. Meta tensors
    # have no data: any such read raises here, so this fails unless the computation is all tensor ops.
    cu = cu_of(PADDED).to("meta")
    seq_id, pos = packed_local_coordinates(cu, 1, 2, num_tokens=sum(PADDED) // 2)
    assert seq_id.device.type == pos.device.type == "meta" and pos.shape == (sum(PADDED) // 2,)
    _, cached = cached_packed_local_coordinates(cu, 1, 2, sum(PADDED) // 2)
    assert cached.device.type == "meta"


@pytest.mark.gpu
def test_packed_positions_do_not_synchronise_on_cuda():
    cu = cu_of(PADDED).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronising call
    try:
        seq_id, pos = packed_local_coordinates(cu, 1, 2, num_tokens=sum(PADDED) // 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert pos.cpu().tolist() == expected_packed(PADDED, 1, 2)[1]


def test_cached_coordinates_are_reused_only_for_the_same_unchanged_tensor():
    cu = cu_of([8, 4])
    first = cached_packed_local_coordinates(cu, 0, 2, 6)
    assert cached_packed_local_coordinates(cu, 0, 2, 6) is first  # every layer of the micro-batch
    other_rank = cached_packed_local_coordinates(cu, 1, 2, 6)
    assert other_rank[1].tolist() == expected_packed([8, 4], 1, 2)[1]
    assert cached_packed_local_coordinates(cu, 0, 2, 6) is first  # ranks share the slot (SDPA gathers K)
    # Equal values in a new tensor: recomputed, same answer.
    assert cached_packed_local_coordinates(cu_of([8, 4]), 0, 2, 6)[1].tolist() == first[1].tolist()
    # The same tensor changed in place (a reused buffer): recomputed with the new boundaries.
    cu.copy_(cu_of([4, 8]))
    assert cached_packed_local_coordinates(cu, 0, 2, 6)[1].tolist() == expected_packed([4, 8], 0, 2)[1]
    with torch.inference_mode():
        frozen = cu_of([4, 4, 4])
        assert cached_packed_local_coordinates(frozen, 0, 2, 6)[1].tolist() == expected_packed([4, 4, 4], 0, 2)[1]


def test_fewer_rows_than_cu_seqlens_covers_are_refused():
    with pytest.raises(ValueError, match="cu_seqlens ends at token 12 but the batch holds 8 tokens"):
        packed_local_coordinates(cu_of([8, 4]), 0, 2, num_tokens=4)


def test_packed_cp_group_is_decided_as_transformer_engine_decides_it():
    default, dynamic = FakeGroup(0, 2), FakeGroup(1, 4)
    assert packed_cp_group(None, default) is default
    assert packed_cp_group(PackedSeqParams(qkv_format="thd"), default) is default
    assert packed_cp_group(PackedSeqParams(qkv_format="thd", cp_group=dynamic), default) is dynamic
    # local_cp_size without a group: CP is off for this micro-batch (TEDotProductAttention.forward).
    assert packed_cp_group(PackedSeqParams(qkv_format="thd", local_cp_size=1), default) is None
    assert rank_and_size(None) == (0, 1) and rank_and_size(dynamic) == (1, 4)
