"""Our context-parallel layout against megatron-core's own slicing code."""

import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank, get_pos_emb_on_this_cp_rank

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.positions import cp_local_indices, packed_local_coordinates
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
