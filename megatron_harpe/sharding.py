"""Megatron tensor/pipeline-parallel layout of a full (TP=1, PP=1) megatron state dict.

A parallel model holds, per rank, a slice of each tensor-parallel parameter along its
``partition_dim`` and, per pipeline stage, a contiguous run of layers under local indices. SwiGLU's
``linear_fc1`` is the exception to plain slicing: megatron keeps ``[gate; up]`` per rank, so rank ``r``
holds ``[gate_r; up_r]``. The fused ``linear_qkv`` is already grouped per query group
(``[q_1..q_n, k, v]`` blocks), so a contiguous slice is whole groups.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def is_glu_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and re.search(r"mlp\.linear_fc1\.(weight|bias)$", name) is not None


def tp_slice(full: Tensor, partition_dim: int, tp_rank: int, tp_size: int, glu: bool = False) -> Tensor:
    """This TP rank's part of ``full``."""
    if tp_size == 1:
        return full
    if glu:
        gate, up = full.chunk(2, dim=partition_dim)
        return torch.cat([gate.chunk(tp_size, partition_dim)[tp_rank], up.chunk(tp_size, partition_dim)[tp_rank]],
                         dim=partition_dim)
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]


def global_layer_names(model: nn.Module) -> dict[str, str]:
    """Map this stage's local parameter names to their names in the full model (global layer index)."""
    offsets = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        for local, layer in enumerate(decoder.layers):
            offsets[local] = layer.layer_number - 1
    names = {}
    for name, _ in model.named_parameters():
        m = _LAYER.match(name)
        names[name] = f"{m.group(1)}{offsets[int(m.group(2))]}{m.group(3)}" if m else name
    return names


def local_view(model: nn.Module, full: dict[str, Tensor], tp_rank: int, tp_size: int,
               gated_linear_unit: bool) -> dict[str, Tensor]:
    """``{local parameter name: this rank's slice of the full tensor}`` for every parameter of ``model``."""
    names = global_layer_names(model)
    out = {}
    for name, param in model.named_parameters():
        tensor = full[names[name]]
        if getattr(param, "tensor_model_parallel", False):
            tensor = tp_slice(tensor, param.partition_dim, tp_rank, tp_size, is_glu_fc1(name, gated_linear_unit))
        out[name] = tensor
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, Tensor], tp_rank: int, tp_size: int,
                         gated_linear_unit: bool) -> None:
    """Copy this rank's part of a full (TP=1, PP=1) parameter dict into ``model``."""
    view = local_view(model, full, tp_rank, tp_size, gated_linear_unit)
    for name, param in model.named_parameters():
        if view[name].shape != param.shape:
            raise ValueError(f"{name}: full tensor slices to {tuple(view[name].shape)} but the model holds "
                             f"{tuple(param.shape)}")
        param.copy_(view[name])
