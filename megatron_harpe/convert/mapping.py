"""The one Hugging Face Llama <-> megatron-core GPT mapping, used by both directions and by resharding.

Each row names a megatron parameter, the Hugging Face tensors it is made of, and how they combine:
``same`` (copied), ``qkv`` (q/k/v rows regrouped per query group as ``[q_1..q_n, k, v]``, the layout of megatron's
fused ``linear_qkv``), ``gate_up`` (SwiGLU ``[gate; up]``), ``vocab`` (rows padded to megatron's padded vocabulary;
stripped on export). Hugging Face's q/k rows are already in the rotate-half order megatron uses with
``rotary_interleaved=False``: no permutation. Tensor parallelism slices megatron tensors along ``partition_dim``
(``megatron_harpe.sharding``), pipeline parallelism gives each stage a contiguous run of layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from megatron_harpe.command import RunError
from megatron_harpe.shape import LlamaShape
from megatron_harpe.sharding import tp_slice

# (megatron name under decoder.layers.N., Hugging Face names under model.layers.N., combination)
LAYER_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "same"),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "same"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "same"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "same"),
)
# (megatron name, Hugging Face name, combination, pipeline stage that holds it)
GLOBAL_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab", "first"),
    ("decoder.final_layernorm.weight", "model.norm.weight", "same", "last"),
    ("output_layer.weight", "lm_head.weight", "vocab", "last"),
)
# Tensor-parallel partition dimension by megatron module (column-parallel 0, row-parallel 1); the rest is replicated.
PARTITION_DIM = {"linear_qkv": 0, "linear_fc1": 0, "word_embeddings": 0, "output_layer": 0,
                 "linear_proj": 1, "linear_fc2": 1}
# Linear modules whose (empty) ``_extra_state`` megatron's state dicts carry, by layer spec.
EXTRA_STATE_MODULES = {
    "local": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
    "transformer_engine": ("self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention",
                           "mlp.linear_fc1", "mlp.linear_fc2"),
}
# Transformer Engine fuses the norms into the next linear: megatron's own local -> TE key map.
TE_NORM_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                 "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class ConversionError(RunError, ValueError):
    """A checkpoint or a layout the conversion cannot handle (exit 1); the message says what to do."""


# --- combinations ----------------------------------------------------------------------------------------------

def to_megatron(combination: str, hf: Sequence[Tensor], shape: LlamaShape, padded_vocab: int) -> Tensor:
    if combination == "same":
        return hf[0]
    if combination == "gate_up":
        return torch.cat(hf, dim=0)
    if combination == "vocab":
        (weight,) = hf
        if weight.shape[0] > padded_vocab:
            raise ConversionError(f"vocabulary {weight.shape[0]} exceeds the padded size {padded_vocab}")
        return torch.cat([weight, weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])])
    if combination == "qkv":
        q, k, v = hf
        groups, d, hidden = shape.num_query_groups, shape.head_dim, shape.hidden_size
        per_group = shape.num_attention_heads // groups
        grouped = torch.cat([q.reshape(groups, per_group * d, hidden), k.reshape(groups, d, hidden),
                             v.reshape(groups, d, hidden)], dim=1)
        return grouped.reshape(groups * (per_group + 2) * d, hidden)
    raise KeyError(combination)


def to_hf(combination: str, megatron: Tensor, shape: LlamaShape) -> tuple[Tensor, ...]:
    if combination == "same":
        return (megatron,)
    if combination == "gate_up":
        return tuple(megatron.chunk(2, dim=0))
    if combination == "vocab":
        return (megatron[: shape.vocab_size],)
    if combination == "qkv":
        groups, d, hidden = shape.num_query_groups, shape.head_dim, shape.hidden_size
        per_group = shape.num_attention_heads // groups
        grouped = megatron.reshape(groups, (per_group + 2) * d, hidden)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)
    raise KeyError(combination)


# --- tensor and pipeline parallel layout -----------------------------------------------------------------------

def partition_dim(megatron_name: str) -> int | None:
    module, parameter = megatron_name.rsplit(".", 2)[-2:]
    if parameter.startswith("layer_norm_"):  # Transformer Engine's fused norm: replicated, whatever module holds it
        return None
    return PARTITION_DIM.get(module)


def split_tp(megatron_name: str, full: Tensor, tp: int) -> list[Tensor]:
    """Every TP rank's part of a full megatron tensor (SwiGLU fc1 keeps ``[gate_r; up_r]`` per rank)."""
    dim = partition_dim(megatron_name)
    if dim is None or tp == 1:
        return [full] * tp
    glu = megatron_name.endswith("linear_fc1.weight")
    return [tp_slice(full, dim, rank, tp, glu) for rank in range(tp)]


def merge_tp(megatron_name: str, parts: Sequence[Tensor]) -> Tensor:
    """The inverse of :func:`split_tp`."""
    dim = partition_dim(megatron_name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if megatron_name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(list(parts), dim=dim)


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    per_stage = num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def stage_has(where: str, pp: int, pp_rank: int) -> bool:
    return (where == "first" and pp_rank == 0) or (where == "last" and pp_rank == pp - 1)


def megatron_layer_name(local_layer: int, name: str, transformer_impl: str = "local") -> str:
    """The state-dict key of a layer parameter (Transformer Engine names its fused norms differently)."""
    if transformer_impl == "transformer_engine":
        for local, te in TE_NORM_NAMES.items():
            if name.startswith(local):
                name = te + name[len(local):]
    return f"decoder.layers.{local_layer}.{name}"


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def parse_layer_key(key: str) -> tuple[int, str] | None:
    """``(local layer, name in LAYER_TABLE's spelling)`` for a layer key of either spec, else None."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    name = m.group(2)
    for local, te in TE_NORM_NAMES.items():
        if name.startswith(te):
            name = local + name[len(te):]
    return int(m.group(1)), name


def hf_layer_name(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


_GLOBAL_ROWS = {megatron: ((hf,), combination) for megatron, hf, combination, _ in GLOBAL_TABLE}
_LAYER_ROWS = {megatron: (hf_names, combination) for megatron, hf_names, combination in LAYER_TABLE}


def hf_source(megatron_name: str) -> tuple[list[str], str]:
    """``(Hugging Face names, combination)`` of a full (TP=1/PP=1) megatron tensor, either spec's spelling."""
    if megatron_name in _GLOBAL_ROWS:
        hf_names, combination = _GLOBAL_ROWS[megatron_name]
        return list(hf_names), combination
    parsed = parse_layer_key(megatron_name)
    if parsed is None or parsed[1] not in _LAYER_ROWS:
        raise ConversionError(f"unexpected tensor {megatron_name} in the checkpoint: not a Llama parameter")
    layer, local = parsed
    hf_names, combination = _LAYER_ROWS[local]
    return [hf_layer_name(layer, n) for n in hf_names], combination


def full_megatron_state(read_hf: Callable[[str], Tensor], shape: LlamaShape, padded_vocab: int) -> dict[str, Tensor]:
    """The whole TP=1/PP=1 megatron state dict from ``read_hf(name) -> Tensor`` (tests and torch_dist)."""
    state = {}
    for megatron, hf, combination, _ in GLOBAL_TABLE:
        state[megatron] = to_megatron(combination, [read_hf(hf)], shape, padded_vocab)
    for layer in range(shape.num_layers):
        for megatron, hf_names, combination in LAYER_TABLE:
            state[megatron_layer_name(layer, megatron)] = to_megatron(
                combination, [read_hf(hf_layer_name(layer, n)) for n in hf_names], shape, padded_vocab)
    return state
