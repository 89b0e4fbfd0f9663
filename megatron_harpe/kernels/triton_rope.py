"""Fused per-head RoPE in Triton: one pass per tensor, angles computed in registers.

Each program takes one (row, batch) of ``q`` or ``k`` and a block of heads; it reads the row's position
and its heads' group frequencies, computes ``angle = position * inv_freq`` in float32, rotates the pairs
and writes the result. Backward is the same kernel rotating by ``-angle``. Nothing but the positions and
the ``[groups, d_rot/2]`` table is kept for backward. Rotation is computed in float32 and rounded once
(megatron's unfused path rounds cos/sin and each product to the activation dtype), so bf16 results agree
with the torch path within bf16 rounding rather than bit for bit.

Runs on CUDA; on a CPU it runs under ``TRITON_INTERPRET=1`` (slow, for tests on small shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _rope_kernel(x_ptr, out_ptr, pos_ptr, inv_ptr,
                     stride_xr, stride_xb, stride_xh, stride_or, stride_ob, stride_oh,
                     batch, heads, heads_per_group,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
        # 64-bit offsets: program ids and strides are int32, and row * stride overflows once the tensor
        # (a view of the fused QKV counts its whole base) reaches 2^31 elements.
        row_batch = tl.program_id(0).to(tl.int64)
        row = row_batch // batch
        b = row_batch % batch
        h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        i = tl.arange(0, BLOCK_HALF)
        mask = (h[:, None] < heads) & (i[None, :] < HALF)

        position = tl.load(pos_ptr + row).to(tl.float32)
        group = h // heads_per_group
        inv = tl.load(inv_ptr + group[:, None] * HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        angle = position * inv
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        if INVERSE:
            sin = -sin

        if INTERLEAVED:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + HALF
        x_row = x_ptr + row * stride_xr + b * stride_xb + h[:, None] * stride_xh
        o_row = out_ptr + row * stride_or + b * stride_ob + h[:, None] * stride_oh
        x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + first[None, :], (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + second[None, :], (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _rope(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """Rotate ``x`` ([rows, b, heads, d] or [rows, heads, d]) out of place."""
    x4 = x if x.dim() == 4 else x.unsqueeze(1)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    rows, batch, heads, dim = x4.shape
    groups, half = inv_freq.shape
    out = torch.empty_like(x4, memory_format=torch.contiguous_format)
    if 2 * half < dim:  # the unrotated tail passes through
        out[..., 2 * half:] = x4[..., 2 * half:]
    block_h = min(triton.next_power_of_2(heads), 16)
    grid = (rows * batch, triton.cdiv(heads, block_h))
    _rope_kernel[grid](
        x4, out, positions.contiguous(), inv_freq.contiguous(),
        x4.stride(0), x4.stride(1), x4.stride(2), out.stride(0), out.stride(1), out.stride(2),
        batch, heads, heads // groups,
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half),
        INTERLEAVED=interleaved, INVERSE=inverse,
    )
    return out if x.dim() == 4 else out.squeeze(1)


def rotate_qk_triton(q, k, positions: Tensor, inv_freq: Tensor, interleaved: bool, inverse: bool):
    """Rotate q and k (either may be None) by +angle or -angle, one kernel launch each."""
    if not HAVE_TRITON:
        raise RuntimeError("the Triton RoPE kernel needs triton (it ships with CUDA builds of torch); use impl='torch'")
    positions = positions.float()
    return tuple(None if t is None else _rope(t, positions, inv_freq, interleaved, inverse) for t in (q, k))
