"""The memory-lean torch RoPE kernel against megatron's unfused RoPE, a float64 reference and gradcheck."""

import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_harpe.kernels import harpe_rope_qk
from megatron_harpe.kernels.saved_bytes import saved_bytes
from megatron_harpe.positions import packed_local_coordinates
from megatron_harpe.rotary import inverse_frequencies, materialize_frequencies
from test_rotary import FakeGroup
from utils import per_head_rope_reference, tiny_config

BASES = [1e4, 3e5, 1e6, 5e6]


def harpe_rope_qk_torch(q, k, positions, inv_freq, interleaved=False):
    return harpe_rope_qk(q, k, positions, inv_freq, interleaved, impl="torch")


def inputs(rows, batch, heads, groups, dim, dtype, seed=0, thd=False):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, heads, dim) if thd else (rows, batch, heads, dim)
    kshape = (rows, groups, dim) if thd else (rows, batch, groups, dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(kshape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups", [(4, 4), (8, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_frac", [1.0, 0.5])
def test_equals_megatron_unfused_per_head_rope_bit_for_bit(dtype, heads, groups, interleaved, rot_frac):
    rows, dim = 40, 32
    rot = int(dim * rot_frac)
    inv = inverse_frequencies(BASES[:groups], rot)
    positions = torch.arange(rows, dtype=torch.float32) + 3000
    q, k = inputs(rows, 2, heads, groups, dim, dtype)
    q_freqs, k_freqs = materialize_frequencies(positions, inv, heads // groups, interleaved)
    config = tiny_config(rotary_interleaved=interleaved)
    expected_q = apply_rotary_pos_emb(q, q_freqs, config=config, cp_group=FakeGroup(0, 1))
    expected_k = apply_rotary_pos_emb(k, k_freqs, config=config, cp_group=FakeGroup(0, 1))
    got_q, got_k = harpe_rope_qk_torch(q, k, positions, inv, interleaved)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_float64_per_head_reference(dtype):
    rows, heads, groups, dim = 32, 8, 4, 32
    q, k = inputs(rows, 1, heads, groups, dim, dtype)
    positions = torch.arange(rows, dtype=torch.float32) + 131072 - rows
    inv = inverse_frequencies(BASES, dim)
    got_q, got_k = harpe_rope_qk_torch(q, k, positions, inv)
    ref_q = per_head_rope_reference(q, positions, [BASES[h // 2] for h in range(heads)], dim)
    ref_k = per_head_rope_reference(k, positions, BASES, dim)
    m = q.float().abs().max().item()
    # The float32 angle is off by up to 2^-22 relative (test_angle_accuracy): 0.03 rad at 131072 for the
    # fastest frequency; a pair (x1, x2) then moves by at most sqrt(2) * m times that.
    tol = 2.0**-22 * 131072 * 1.5 * m
    if dtype == torch.bfloat16:
        # plus rounding cos, sin, both products and the sum to bf16 (see test_triton_rope): 6 * 2^-9 * m.
        tol += 6 * 2.0**-9 * m
    assert (got_q.double() - ref_q).abs().max() < tol
    assert (got_k.double() - ref_k).abs().max() < tol


def test_angle_accuracy_up_to_131072():
    """Angles are position * inv_freq in float32, as megatron computes them.

    Documented bound: |angle32 - angle64| <= 2^-22 * angle64 (four float32 ulps: one from the
    position, at most two from the float32 inverse frequency, one from the product).
    """
    for base in (1e4, 1e6, 5e6):
        inv32 = inverse_frequencies([base], 128)[0]
        inv64 = 1.0 / base ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
        positions = torch.tensor([1, 4095, 32767, 65536, 100000, 131071], dtype=torch.float32)
        angle32 = (positions[:, None] * inv32[None]).double()
        angle64 = positions.double()[:, None] * inv64[None]
        assert ((angle32 - angle64).abs() <= 2.0**-22 * angle64).all()


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    q, k = inputs(6, 2, 4, 2, 8, torch.float64)
    q.requires_grad_(), k.requires_grad_()
    positions = torch.arange(6, dtype=torch.float32) * 7
    inv = inverse_frequencies([1e4, 1e6], 6)  # rot_dim 6 < 8: the tail passes through
    assert torch.autograd.gradcheck(lambda a, b: harpe_rope_qk_torch(a, b, positions, inv, interleaved), (q, k))


def test_saves_only_positions_and_the_table():
    rows, heads, dim = 512, 8, 64
    q, k = inputs(rows, 2, heads, heads, dim, torch.bfloat16)
    q.requires_grad_(), k.requires_grad_()
    positions = torch.arange(rows, dtype=torch.float32)
    inv = inverse_frequencies([1e4 * (h + 1) for h in range(heads)], dim)
    assert saved_bytes(harpe_rope_qk_torch, q, k, positions, inv) == positions.nbytes + inv.nbytes
    out_q, out_k = harpe_rope_qk_torch(q, k, positions, inv)
    (out_q.float().sum() + out_k.float().sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_packed_rows_take_per_token_positions():
    # THD: [t, h, d] with each token's position inside its own sequence (and CP chunk).
    cu = torch.tensor([0, 8, 12, 24])
    for cp_rank in range(2):
        _, within = packed_local_coordinates(cu, cp_rank, 2)
        positions = within.float()
        q, k = inputs(len(positions), 1, 4, 2, 16, torch.float32, thd=True)
        inv = inverse_frequencies([1e4, 1e6], 16)
        got_q, _ = harpe_rope_qk(q, k, positions, inv, impl="torch")
        ref_q = per_head_rope_reference(q.unsqueeze(1), positions, [1e4, 1e4, 1e6, 1e6], 16).squeeze(1)
        assert (got_q.double() - ref_q).abs().max() < 1e-5


def test_unknown_kernel_is_refused():
    q, k = inputs(4, 1, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="unknown RoPE kernel"):
        harpe_rope_qk(q, k, torch.arange(4.0), inverse_frequencies([1e4, 1e5], 8), impl="cuda")
