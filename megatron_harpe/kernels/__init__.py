"""Per-head RoPE kernels that cost what standard RoPE costs.

``harpe_rope_qk(q, k, positions, inv_freq, interleaved, impl)`` rotates queries and keys with one RoPE
base per query group. ``positions`` holds one (float32, already interpolated) position per row of q/k
(dim 0: the sequence for ``[s, b, h, d]``, the token for packed ``[t, h, d]``); ``inv_freq`` is this
rank's ``[groups, d_rot/2]`` table. Query head ``j`` uses group ``j // (heads / groups)``.

Implementations: ``torch`` (any device), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``), and
``auto`` = Triton on CUDA tensors, torch otherwise. Neither saves more than the positions and the table
(:func:`megatron_harpe.kernels.saved_bytes.saved_bytes` measures what a call saves for backward).
"""

from __future__ import annotations

import torch
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


_reported: set[str] = set()


def _report_first_use(kernel: str, device) -> None:
    """One line per kernel and process (rank 0 of a job): what really ran, for logs and benchmarks/gpu_check."""
    if kernel in _reported:
        return
    _reported.add(kernel)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"HARPE RoPE kernel: {kernel} (first call, on {device})", flush=True)


def harpe_rope_qk(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool = False,
                  impl: str = "auto") -> tuple[Tensor, Tensor]:
    kernel = resolve_kernel(impl, q.device)
    _report_first_use(kernel, q.device)
    rotate = rotate_qk_triton if kernel == "triton" else rotate_qk_torch
    return HarpeRopeQK.apply(q, k, positions, inv_freq, interleaved, rotate)
