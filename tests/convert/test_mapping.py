"""Each rule of the Hugging Face <-> megatron conversion table, against references written out here."""

from __future__ import annotations

import pytest
import torch

from megatron_harpe.convert.mapping import (
    GLOBAL_TABLE,
    LAYER_TABLE,
    PARTITION_DIM,
    ConversionError,
    full_megatron_state,
    hf_layer_name,
    megatron_layer_name,
    merge_tp,
    parse_layer_key,
    partition_dim,
    split_tp,
    stage_has,
    stage_layers,
    to_hf,
    to_megatron,
)
from megatron_harpe.shape import LlamaShape

# hidden 32, head_dim 4: MHA (8 heads, 8 groups) and GQA (8 heads in 2 groups, 4 per group)
SHAPES = {
    "mha": LlamaShape(num_layers=4, hidden_size=32, ffn_hidden_size=24, num_attention_heads=8, vocab_size=100),
    "gqa": LlamaShape(num_layers=4, hidden_size=32, ffn_hidden_size=24, num_attention_heads=8, num_query_groups=2,
                      vocab_size=100),
}


def numbered(*size: int) -> torch.Tensor:
    """Every element distinct: a wrong row shows."""
    return torch.arange(torch.Size(size).numel(), dtype=torch.float64).reshape(size)


def hf_qkv(shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, h = shape.head_dim, shape.hidden_size
    q = numbered(shape.num_attention_heads * d, h)
    k = numbered(shape.num_query_groups * d, h) + 10_000
    v = numbered(shape.num_query_groups * d, h) + 20_000
    return q, k, v


def reference_qkv(q, k, v, shape: LlamaShape, groups: range | None = None) -> torch.Tensor:
    """megatron's fused QKV, head by head: per query group its query heads, then its key head, then its value head."""
    d = shape.head_dim
    per_group = shape.num_attention_heads // shape.num_query_groups
    rows = []
    for g in groups if groups is not None else range(shape.num_query_groups):
        rows += [q[(g * per_group + i) * d:(g * per_group + i + 1) * d] for i in range(per_group)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_qkv_is_grouped_per_query_group(kind):
    shape = SHAPES[kind]
    q, k, v = hf_qkv(shape)
    fused = to_megatron("qkv", [q, k, v], shape, padded_vocab=128)
    assert torch.equal(fused, reference_qkv(q, k, v, shape))
    assert all(torch.equal(a, b) for a, b in zip(to_hf("qkv", fused, shape), (q, k, v), strict=True))


@pytest.mark.parametrize("kind, tp", [("mha", 2), ("mha", 8), ("gqa", 2)])
def test_qkv_tp_parts_hold_whole_query_groups(kind, tp):
    """A column-parallel slice of the fused QKV is exactly its rank's query groups (heads with their K and V)."""
    shape = SHAPES[kind]
    q, k, v = hf_qkv(shape)
    fused = to_megatron("qkv", [q, k, v], shape, padded_vocab=128)
    name = megatron_layer_name(0, "self_attention.linear_qkv.weight")
    parts = split_tp(name, fused, tp)
    per_rank = shape.num_query_groups // tp
    for rank, part in enumerate(parts):
        assert torch.equal(part, reference_qkv(q, k, v, shape, range(rank * per_rank, (rank + 1) * per_rank)))
    assert torch.equal(merge_tp(name, parts), fused)


def test_gate_up_and_same():
    gate, up = numbered(6, 4), numbered(6, 4) + 100
    fused = to_megatron("gate_up", [gate, up], SHAPES["mha"], padded_vocab=128)
    assert torch.equal(fused, torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip(to_hf("gate_up", fused, SHAPES["mha"]), (gate, up), strict=True))
    w = numbered(3, 5)
    assert to_megatron("same", [w], SHAPES["mha"], padded_vocab=128) is w
    assert to_hf("same", w, SHAPES["mha"]) == (w,)


@pytest.mark.parametrize("padded", [100, 128, 256])
def test_vocabulary_is_padded_with_zero_rows_and_stripped(padded):
    shape = SHAPES["mha"]
    embedding = numbered(shape.vocab_size, 6) + 1
    megatron = to_megatron("vocab", [embedding], shape, padded)
    assert megatron.shape == (padded, 6)
    assert torch.equal(megatron[:shape.vocab_size], embedding) and not megatron[shape.vocab_size:].any()
    (back,) = to_hf("vocab", megatron, shape)
    assert torch.equal(back, embedding)


def test_vocabulary_larger_than_the_padded_size_is_refused():
    with pytest.raises(ConversionError, match="vocabulary 100 exceeds the padded size 64"):
        to_megatron("vocab", [numbered(100, 6)], SHAPES["mha"], 64)


def test_unknown_combination_is_a_key_error():
    with pytest.raises(KeyError):
        to_megatron("transpose", [numbered(2, 2)], SHAPES["mha"], 128)
    with pytest.raises(KeyError):
        to_hf("transpose", numbered(2, 2), SHAPES["mha"])


@pytest.mark.parametrize("name, dim", [
    ("decoder.layers.3.self_attention.linear_qkv.weight", 0),
    ("decoder.layers.3.mlp.linear_fc1.weight", 0),
    ("embedding.word_embeddings.weight", 0),
    ("output_layer.weight", 0),
    ("decoder.layers.3.self_attention.linear_proj.weight", 1),
    ("decoder.layers.3.mlp.linear_fc2.weight", 1),
    ("decoder.layers.3.input_layernorm.weight", None),
    ("decoder.layers.3.pre_mlp_layernorm.weight", None),
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", None),  # TE's fused norms stay replicated
    ("decoder.layers.3.mlp.linear_fc1.layer_norm_weight", None),
    ("decoder.final_layernorm.weight", None),
])
def test_partition_dim_per_module(name, dim):
    assert partition_dim(name) == dim


def test_every_partitioned_module_is_in_the_table():
    modules = {n.rsplit(".", 2)[-2] for n, _, _ in LAYER_TABLE} | {m.rsplit(".", 2)[-2] for m, _, _, _ in GLOBAL_TABLE}
    assert set(PARTITION_DIM) <= modules


@pytest.mark.parametrize("name, size", [
    ("decoder.layers.0.self_attention.linear_qkv.weight", (16, 6)),
    ("decoder.layers.0.self_attention.linear_proj.weight", (6, 16)),
    ("decoder.layers.0.mlp.linear_fc2.weight", (6, 16)),
    ("embedding.word_embeddings.weight", (16, 6)),
    ("output_layer.weight", (16, 6)),
    ("decoder.layers.0.input_layernorm.weight", (6,)),
])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_and_merge_are_inverse(name, size, tp):
    full = numbered(*size)
    parts = split_tp(name, full, tp)
    assert len(parts) == tp
    dim = partition_dim(name)
    if dim is None:
        assert all(p is full for p in parts)  # replicated: every rank holds it whole
    else:
        assert all(torch.equal(p, c) for p, c in zip(parts, full.chunk(tp, dim), strict=True))
    assert torch.equal(merge_tp(name, parts), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_keeps_gate_and_up_per_rank(tp):
    """SwiGLU's fc1 is [gate; up]: rank r holds [gate_r; up_r], not the r-th contiguous block."""
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    gate, up = numbered(8, 3), numbered(8, 3) + 1000
    parts = split_tp(name, torch.cat([gate, up]), tp)
    for rank, part in enumerate(parts):
        assert torch.equal(part, torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]))
    assert torch.equal(merge_tp(name, parts), torch.cat([gate, up]))


@pytest.mark.parametrize("num_layers, pp, expected", [
    (4, 1, [range(0, 4)]),
    (4, 2, [range(0, 2), range(2, 4)]),
    (6, 3, [range(0, 2), range(2, 4), range(4, 6)]),
])
def test_stage_layers_are_contiguous_runs(num_layers, pp, expected):
    assert [stage_layers(num_layers, pp, rank) for rank in range(pp)] == expected


@pytest.mark.parametrize("pp, first, last", [(1, [True], [True]), (3, [True, False, False], [False, False, True])])
def test_stage_has_first_and_last(pp, first, last):
    assert [stage_has("first", pp, r) for r in range(pp)] == first
    assert [stage_has("last", pp, r) for r in range(pp)] == last


@pytest.mark.parametrize("name, local, te", [
    ("input_layernorm.weight", "decoder.layers.2.input_layernorm.weight",
     "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"),
    ("pre_mlp_layernorm.weight", "decoder.layers.2.pre_mlp_layernorm.weight",
     "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"),
    ("self_attention.linear_qkv.weight", "decoder.layers.2.self_attention.linear_qkv.weight",
     "decoder.layers.2.self_attention.linear_qkv.weight"),
    ("mlp.linear_fc2.weight", "decoder.layers.2.mlp.linear_fc2.weight", "decoder.layers.2.mlp.linear_fc2.weight"),
])
def test_transformer_engine_norm_names_both_ways(name, local, te):
    assert megatron_layer_name(2, name) == megatron_layer_name(2, name, "local") == local
    assert megatron_layer_name(2, name, "transformer_engine") == te
    assert parse_layer_key(local) == parse_layer_key(te) == (2, name)


@pytest.mark.parametrize("key", ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                 "decoder.layers.x.mlp.linear_fc1.weight"])
def test_parse_layer_key_skips_non_layer_keys(key):
    assert parse_layer_key(key) is None


def test_hf_layer_name():
    assert hf_layer_name(7, "self_attn.q_proj.weight") == "model.layers.7.self_attn.q_proj.weight"


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_full_state_applies_each_row(kind):
    shape = SHAPES[kind]
    q, k, v = hf_qkv(shape)
    d_ffn, h = shape.ffn_hidden_size, shape.hidden_size
    hf = {"model.embed_tokens.weight": numbered(shape.vocab_size, h), "model.norm.weight": numbered(h),
          "lm_head.weight": numbered(shape.vocab_size, h) + 7}
    for layer in range(shape.num_layers):
        hf.update({hf_layer_name(layer, n): t + layer for n, t in [
            ("input_layernorm.weight", numbered(h)), ("post_attention_layernorm.weight", numbered(h) + 1),
            ("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", k), ("self_attn.v_proj.weight", v),
            ("self_attn.o_proj.weight", numbered(h, h)), ("mlp.gate_proj.weight", numbered(d_ffn, h)),
            ("mlp.up_proj.weight", numbered(d_ffn, h) + 3), ("mlp.down_proj.weight", numbered(h, d_ffn))]})
    state = full_megatron_state(hf.__getitem__, shape, padded_vocab=128)
    assert len(state) == len(GLOBAL_TABLE) + shape.num_layers * len(LAYER_TABLE)
    assert state["embedding.word_embeddings.weight"].shape == (128, h)
    assert torch.equal(state["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    last = shape.num_layers - 1
    assert torch.equal(state[f"decoder.layers.{last}.self_attention.linear_qkv.weight"],
                       reference_qkv(q + last, k + last, v + last, shape))
    assert torch.equal(state[f"decoder.layers.{last}.pre_mlp_layernorm.weight"],
                       hf[hf_layer_name(last, "post_attention_layernorm.weight")])
    assert torch.equal(state[f"decoder.layers.{last}.mlp.linear_fc1.weight"],
                       torch.cat([hf[hf_layer_name(last, "mlp.gate_proj.weight")],
                                  hf[hf_layer_name(last, "mlp.up_proj.weight")]]))
