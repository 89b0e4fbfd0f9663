"""Per-head RoPE kernels that cost what standard RoPE costs.

``harpe_rope_qk(q, k, positions, inv_freq, interleaved, impl)`` rotates queries and keys with one RoPE
base per query group. ``positions`` holds one (float32, already interpolated) position per row of q/k
(dim 0: the sequence for ``[s, b, h, d]``, the token for packed ``[t, h, d]``); ``inv_freq`` is this
rank's ``[groups, d_rot/2]`` table. Query head ``j`` uses group ``j // (heads / groups)``.

Implementations: ``torch`` (any device), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``), and
``auto`` = Triton on CUDA tensors, torch otherwise. Neither saves more than the positions and the table.
"""

from __future__ import annotations

from torch import Tensor

from megatron_harpe.kernels.function import HarpeRopeQK
from megatron_harpe.kernels.torch_rope import rotate_qk_torch
from megatron_harpe.kernels.triton_rope import HAVE_TRITON, rotate_qk_triton

KERNEL_IMPLS = ("auto", "torch", "triton")


def resolve_kernel(impl: str, device) -> str:
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"unknown RoPE kernel {impl!r}: choose one of {', '.join(KERNEL_IMPLS)}")
    if impl == "auto":
        return "triton" if HAVE_TRITON and getattr(device, "type", device) == "cuda" else "torch"
    return impl


def harpe_rope_qk(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool = False,
                  impl: str = "auto") -> tuple[Tensor, Tensor]:
    rotate = rotate_qk_triton if resolve_kernel(impl, q.device) == "triton" else rotate_qk_torch
    return HarpeRopeQK.apply(q, k, positions, inv_freq, interleaved, rotate)
