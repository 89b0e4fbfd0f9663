import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.rotary import HarpeRotaryEmbedding, materialize_frequencies
from utils import per_head_rope_reference, tiny_config


class FakeGroup:
    """Just enough of a ProcessGroup for rank/size-driven slicing."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def provider(bases, heads, groups=None, tp=(0, 1), cp=(0, 1), **kwargs):
    kwargs.setdefault("kv_channels", 32)
    kwargs.setdefault("rotary_percent", 1.0)
    return HarpeRotaryEmbedding(bases=bases, num_attention_heads=heads, num_query_groups=groups,
                                tp_group=FakeGroup(*tp), cp_group=FakeGroup(*cp), **kwargs)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent, interpolation", [(1.0, None), (0.5, 2.0)])
@pytest.mark.parametrize("offset", [0, 7])
@pytest.mark.parametrize("cp_rank, cp_size", [(0, 1), (0, 2), (1, 2)])
def test_equal_bases_match_megatron_bit_for_bit(interleaved, rotary_percent, interpolation, offset, cp_rank, cp_size):
    base, seq, heads, groups = 500000, 64, 4, 2
    ours = provider([base] * groups, heads, groups, cp=(cp_rank, cp_size), rotary_percent=rotary_percent,
                    rotary_interleaved=interleaved, seq_len_interpolation_factor=interpolation)
    theirs = RotaryEmbedding(kv_channels=32, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                             seq_len_interpolation_factor=interpolation, rotary_base=base,
                             use_cpu_initialization=True, cp_group=FakeGroup(cp_rank, cp_size))
    with megatron_on_cpu():  # megatron's provider moves inv_freq to "cuda" and pins memory for CP slicing
        expected = theirs(seq, offset=offset)
    expected = expected.cpu()  # on a CUDA machine megatron computed on the GPU (a product each: exact there too)
    q, k = ours(seq, offset=offset)
    assert q.shape == (seq // cp_size, 1, heads, expected.size(-1))
    assert k.shape == (seq // cp_size, 1, groups, expected.size(-1))
    for h in range(heads):
        assert torch.equal(q[:, :, h], expected[:, :, 0])
    for g in range(groups):
        assert torch.equal(k[:, :, g], expected[:, :, 0])


@pytest.mark.parametrize("heads, groups", [(4, 4), (8, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
@pytest.mark.parametrize("offset", [0, 1000])
def test_per_head_rope_matches_plain_reference(heads, groups, interleaved, rotary_percent, offset):
    seq, batch, d = 24, 2, 32
    bases = [1e4 * (3.7 ** g) for g in range(groups)]
    rope = provider(bases, heads, groups, rotary_interleaved=interleaved, rotary_percent=rotary_percent)
    q_emb, k_emb = rope(seq, offset=offset)
    config = tiny_config(rotary_interleaved=interleaved)
    torch.manual_seed(0)
    q = torch.randn(seq, batch, heads, d)
    k = torch.randn(seq, batch, groups, d)
    q_out = apply_rotary_pos_emb(q, q_emb, config=config, cp_group=FakeGroup(0, 1))
    k_out = apply_rotary_pos_emb(k, k_emb, config=config, cp_group=FakeGroup(0, 1))

    positions = torch.arange(seq) + offset
    rot_dim = int(d * rotary_percent)
    q_ref = per_head_rope_reference(q, positions, [bases[h // (heads // groups)] for h in range(heads)], rot_dim, interleaved)
    k_ref = per_head_rope_reference(k, positions, bases, rot_dim, interleaved)
    # float32 rounding: the angle pos * inv_freq carries ~2 ulp of relative error, i.e. up to
    # 2 * 2^-24 * max_pos radians, on |x| <= 5.
    tol = 2 * 2.0**-24 * (seq + offset) * 5 + 1e-5
    assert (q_out.double() - q_ref).abs().max() < tol
    assert (k_out.double() - k_ref).abs().max() < tol


def test_heads_get_their_group_base_and_distinct_bases_differ():
    rope = provider([1e4, 1e6], heads=4, groups=2)
    q, k = rope(16)
    assert torch.equal(q[:, :, 0], k[:, :, 0]) and torch.equal(q[:, :, 1], k[:, :, 0])
    assert torch.equal(q[:, :, 2], k[:, :, 1]) and torch.equal(q[:, :, 3], k[:, :, 1])
    assert not torch.equal(k[:, :, 0], k[:, :, 1])


def test_tensor_parallel_rank_holds_its_groups():
    bases = [1e4, 2e4, 3e4, 4e4]
    full_q, full_k = provider(bases, heads=8, groups=4)(16)
    for rank in range(2):
        q, k = provider(bases, heads=8, groups=4, tp=(rank, 2))(16)
        assert torch.equal(q, full_q[:, :, 4 * rank : 4 * (rank + 1)])
        assert torch.equal(k, full_k[:, :, 2 * rank : 2 * (rank + 1)])


def test_context_parallel_slices_follow_load_balanced_chunks():
    full_q, _ = provider([1e4, 2e4], heads=2)(16)
    chunks = full_q.view(4, 4, *full_q.shape[1:])
    for rank, (a, b) in enumerate([(0, 3), (1, 2)]):
        q, _ = provider([1e4, 2e4], heads=2, cp=(rank, 2))(16)
        assert torch.equal(q, torch.cat([chunks[a], chunks[b]]))
    # Packed sequences: megatron's THD RoPE slices per sequence, so the provider returns every position.
    q_packed, _ = provider([1e4, 2e4], heads=2, cp=(1, 2))(16, packed_seq=True)
    assert torch.equal(q_packed, full_q)


@pytest.mark.parametrize("rope_impl", ["auto", "torch", "triton"])
def test_kernel_paths_get_positions_and_the_table(rope_impl):
    # HARPE's kernels: the same information as megatron's pair, without materializing [s, heads, d].
    rope = provider([1e4, 2e4], heads=4, groups=2, cp=(1, 2), rotary_interleaved=True, rope_impl=rope_impl)
    positions, table = rope(16)
    assert torch.equal(positions, torch.tensor([4.0, 5, 6, 7, 8, 9, 10, 11]))
    assert table is rope.inv_freq
    unfused = provider([1e4, 2e4], heads=4, groups=2, cp=(1, 2), rotary_interleaved=True)(16)
    assert all(map(torch.equal, unfused, materialize_frequencies(positions, table, 2, True)))
    assert rope.rope_impl == rope_impl


def test_unknown_rope_impl_is_refused():
    with pytest.raises(ValueError, match="unknown HARPE RoPE implementation 'fused'"):
        provider([1e4, 2e4], heads=2, rope_impl="fused")


def test_cp_indivisible_sequence_is_refused():
    with pytest.raises(ValueError, match="not divisible by 2 \\* context_parallel_size = 4"):
        provider([1e4, 2e4], heads=2, cp=(0, 2))(18)


def test_table_stays_float32_and_follows_device_moves():
    rope = provider([1e4, 2e4], heads=2)
    expected = rope.inv_freq.clone()
    rope.bfloat16()
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, expected)
    assert "inv_freq" not in rope.state_dict()


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="got 3 bases for 2 query groups"):
        provider([1e4, 2e4, 3e4], heads=4, groups=2)
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size"):
        provider([1e4, 2e4], heads=4, groups=2, tp=(0, 4))
    with pytest.raises(ValueError, match="positive and finite"):
        provider([1e4, -2e4], heads=2)


def test_packed_table_covers_the_whole_pack_on_the_kernel_path():
    # A padded packed sequence can be longer than max_seqlen (megatron's table length); HARPE's kernels index
    # the table by position in the padded sequence, so it must reach the pack's length: rows x CP (x TP with SP).
    params = PackedSeqParams(qkv_format="thd", max_seqlen_q=7, max_seqlen_kv=5)
    rows = torch.empty(10, 1, 64)  # this rank's THD rows, as the decoder input [t, 1, hidden]
    rope = provider([1e4, 2e4], heads=2, cp=(1, 2), rope_impl="torch")
    plain, sequence_parallel = tiny_config(), tiny_config(tp=2, sequence_parallel=True)
    assert rope.get_rotary_seq_len(None, None, rows, plain, params) == 20
    assert rope.get_rotary_seq_len(None, None, rows, sequence_parallel, params) == 40
    params.cp_group = FakeGroup(0, 4)  # megatron's dynamic CP group for this micro-batch
    assert rope.get_rotary_seq_len(None, None, rows, plain, params) == 40
    # Unpacked batches and the unfused path keep megatron's rule (its THD RoPE reads a table as long as the
    # pack as one continuous sequence).
    assert rope.get_rotary_seq_len(None, None, rows, plain, None) == 10
    unfused = provider([1e4, 2e4], heads=2, cp=(1, 2), rope_impl="unfused")
    assert unfused.get_rotary_seq_len(None, None, rows, plain, params) == 7


# megatron's GPTModel calls rotary_pos_emb.get_cos_sin(max_sequence_length) for flash decoding (issue 15, item 7).
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent, interpolation", [(1.0, None), (0.5, 2.0)])
@pytest.mark.parametrize("offset", [0, 7])
def test_get_cos_sin_with_equal_bases_is_megatrons(interleaved, rotary_percent, interpolation, offset):
    base, seq, heads, groups = 500000, 64, 4, 2
    ours = provider([base] * groups, heads, groups, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                    seq_len_interpolation_factor=interpolation)
    theirs = RotaryEmbedding(kv_channels=32, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                             seq_len_interpolation_factor=interpolation, rotary_base=base, use_cpu_initialization=True)
    cos, sin = ours.get_cos_sin(seq, offset)
    expected_cos, expected_sin = theirs.get_cos_sin(seq, offset)
    assert cos.shape == expected_cos.shape == (seq, ours.dim // 2)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_per_group_cos_sin_matches_plain_reference(tp_rank):
    bases, seq, offset = [1e4, 5e4, 2.5e5, 1e6], 48, 5
    ours = provider(bases, heads=8, groups=4, tp=(tp_rank, 2), seq_len_interpolation_factor=2.0)
    cos, sin = ours.get_cos_sin_per_group(seq, offset)
    assert cos.shape == sin.shape == (seq, 2, 16) and cos.dtype == torch.float32
    positions = (torch.arange(seq, dtype=torch.float64) + offset) / 2.0
    for g, base in enumerate(bases[2 * tp_rank : 2 * tp_rank + 2]):
        angle = positions[:, None] / base ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
        torch.testing.assert_close(cos[:, g].double(), torch.cos(angle), rtol=0, atol=1e-5)
        torch.testing.assert_close(sin[:, g].double(), torch.sin(angle), rtol=0, atol=1e-5)


def test_get_cos_sin_refuses_distinct_bases_and_names_flash_decode():
    with pytest.raises(NotImplementedError, match=r"flash_decode / --flash-decode"):
        provider([1e4, 1e6], heads=4, groups=2).get_cos_sin(16)
