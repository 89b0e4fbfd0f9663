"""The autograd function shared by HARPE's RoPE kernels: save positions and the table, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class HarpeRopeQK(torch.autograd.Function):
    """``(q, k) -> (rope(q), rope(k))`` with per-group frequencies.

    ``rotate(q, k, positions, inv_freq, interleaved, inverse)`` is a kernel (torch or Triton). Backward
    recomputes the angles from the saved positions and ``[groups, d_rot/2]`` table and applies the
    inverse rotation (the transpose of the forward map).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool,
                rotate: Callable):
        ctx.save_for_backward(positions, inv_freq)
        ctx.interleaved, ctx.rotate = interleaved, rotate
        return rotate(q, k, positions, inv_freq, interleaved, False)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        positions, inv_freq = ctx.saved_tensors
        return (*ctx.rotate(grad_q, grad_k, positions, inv_freq, ctx.interleaved, True), None, None, None, None)
