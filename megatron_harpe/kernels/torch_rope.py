"""Per-head RoPE for q and k with torch ops (any device); the autograd wrapper is in ``function.py``.

Megatron's unfused RoPE saves ``cos``/``sin`` of shape ``[s, 1, h, d]`` for backward in every layer;
with per-head frequencies that is gigabytes per layer at 128k tokens. Here nothing is saved but the
positions ``[rows]`` and the inverse-frequency table ``[groups, d_rot/2]``: backward recomputes the angles
and applies the inverse rotation. The forward arithmetic is megatron's, element for element (angles
``position * inv_freq`` in float32, ``cos``/``sin`` cast to the activation dtype, ``t*cos + rot(t)*sin``),
so outputs equal megatron's unfused per-head RoPE bit for bit. q and k share one angle computation
(the query heads of a group use the group's angles).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pairs(x: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members (a, b) of every rotation pair: halves (rotate-half) or even/odd lanes (interleaved)."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def join_pairs(a: Tensor, b: Tensor, interleaved: bool) -> Tensor:
    """Inverse of ``_pairs``: lay out (a, b) as halves (rotate-half) or even/odd lanes (interleaved)."""
    if interleaved:
        return torch.stack((a, b), dim=-1).flatten(-2)
    return torch.cat((a, b), dim=-1)


def cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``[rows, groups, d_rot/2]`` cos and sin in ``dtype``; angles in float32 as megatron computes them."""
    angles = positions.float()[:, None, None] * inv_freq.float()[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _broadcastable(table: Tensor, ndim: int) -> Tensor:
    """[rows, groups, d_rot/2] -> [rows, 1.., groups, 1, d_rot/2] against a grouped tensor of ``ndim`` dims."""
    table = table.unsqueeze(-2)
    while table.dim() < ndim:
        table = table.unsqueeze(1)
    return table


def _rotate_by(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """Rotate every pair (a, b) by +angle (or -angle): megatron's ``t*cos + R(t)*sin`` term by term.

    Megatron computes ``a*c + (-b)*s`` and ``b*c + a*s`` with cos/sin duplicated to the full rotary
    width; the same products and sums on half-width tables round identically, without the copies.
    """
    x = t.unflatten(-2, (cos.size(1), t.size(-2) // cos.size(1)))  # [rows, (b,) groups, heads/group, d]
    rot = 2 * cos.size(-1)
    c, s = _broadcastable(cos, x.dim()), _broadcastable(sin, x.dim())
    a, b = _pairs(x[..., :rot], interleaved)
    if inverse:  # the transpose: what autograd computes for megatron's forward
        out = join_pairs(a * c + b * s, b * c - a * s, interleaved)
    else:
        out = join_pairs(a * c - b * s, b * c + a * s, interleaved)
    if rot < x.size(-1):
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return out.flatten(-3, -2)


def rotate_qk_torch(q, k, positions: Tensor, inv_freq: Tensor, interleaved: bool, inverse: bool):
    """Rotate q and k (either may be None) by +angle or -angle; one cos/sin table serves both."""
    dtype = (q if q is not None else k).dtype
    cos, sin = cos_sin(positions, inv_freq, dtype)
    return tuple(None if t is None else _rotate_by(t, cos, sin, interleaved, inverse) for t in (q, k))
