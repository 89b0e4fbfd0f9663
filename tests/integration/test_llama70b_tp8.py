"""Llama-2-70B with HARPE at TP=8 (and one PP=4 layout): every rank's shapes, bases and parameter counts.

Each rank is megatron's own model, built on the meta device in this process (tests/meta_model.py); the
expected numbers come from the Llama-2 formulas below, never from the model.
"""

import math

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_harpe.bases import select_bases
from megatron_harpe.self_attention import HarpeSelfAttention
from megatron_harpe.shape import SHAPES
from meta_model import FakeProcessGroup, padded_vocab_size, rank_model, rank_parameter_count

SHAPE = SHAPES["70b"]
TP = 8
VOCAB = 32000

# Llama-2-70B (Touvron et al. 2023), written out independently of megatron_harpe.shape.
H, LAYERS, HEADS, GROUPS, FFN = 8192, 80, 64, 8, 28672
HEAD_DIM = H // HEADS  # 128
# Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) x TP.
VOCAB_PADDED = math.ceil(VOCAB / (128 * TP)) * (128 * TP)  # 32768
# Llama-2-70B's published parameter count (the HF checkpoint, vocabulary 32000, untied embeddings).
LLAMA2_70B_PARAMETERS = 68_976_648_192


def layer_weights(tp):
    """One decoder layer's weights on one TP rank: megatron's local names, Llama-2 formulas."""
    qkv_rows = (GROUPS // tp) * (HEADS // GROUPS + 2) * HEAD_DIM  # per group: its queries, one K, one V
    return {
        "input_layernorm.weight": (H,),
        "self_attention.linear_qkv.weight": (qkv_rows, H),
        "self_attention.linear_proj.weight": (H, HEADS * HEAD_DIM // tp),
        "pre_mlp_layernorm.weight": (H,),
        "mlp.linear_fc1.weight": (2 * FFN // tp, H),  # SwiGLU: [gate; up]
        "mlp.linear_fc2.weight": (H, FFN // tp),
    }


def expected_rank_shapes(tp, vocab_padded, layers, pre_process=True, post_process=True):
    shapes = {}
    if pre_process:
        shapes["embedding.word_embeddings.weight"] = (vocab_padded // tp, H)
    for i in range(layers):
        shapes.update({f"decoder.layers.{i}.{name}": shape for name, shape in layer_weights(tp).items()})
    if post_process:
        shapes["decoder.final_layernorm.weight"] = (H,)
        shapes["output_layer.weight"] = (vocab_padded // tp, H)
    return shapes


def llama2_70b_parameters(vocab):
    layer = H * (HEADS + 2 * GROUPS) * HEAD_DIM + HEADS * HEAD_DIM * H + 3 * H * FFN + 2 * H
    return LAYERS * layer + 2 * vocab * H + H


@pytest.fixture(scope="module")
def bases():
    b = select_bases(GROUPS, "peak_valley", 1e6, 5e6, head_dim=HEAD_DIM, target_length=131072)
    assert len(b) == GROUPS and len(set(b)) == GROUPS, b  # distinct, so a rank holding the wrong one shows
    return b


def test_formulas_and_padding():
    assert llama2_70b_parameters(VOCAB) == LLAMA2_70B_PARAMETERS
    assert VOCAB_PADDED == 32768
    assert padded_vocab_size(VOCAB, TP) == VOCAB_PADDED  # megatron's own vocab_size_with_padding
    assert padded_vocab_size(VOCAB, 1) == 32000
    sizes = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")
    assert {k: getattr(SHAPE, k) for k in sizes} == dict(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                                                         num_query_groups=GROUPS, ffn_hidden_size=FFN, vocab_size=VOCAB)
    assert layer_weights(TP)["self_attention.linear_qkv.weight"] == (1280, 8192)
    assert layer_weights(TP)["mlp.linear_fc1.weight"] == (7168, 8192)


def test_builds_on_meta_and_leaves_no_global_state():
    dist_before = torch.distributed.is_initialized()
    mpu_before = parallel_state.model_parallel_is_initialized()
    model = rank_model(SHAPE, tp=TP, pp=1, tp_rank=1, pp_rank=0, num_layers=2)
    assert all(p.is_meta for p in model.parameters())
    assert not model.rotary_pos_emb.inv_freq.is_meta and not model.rotary_pos_emb._inv_freq_master.is_meta
    assert torch.distributed.is_initialized() == dist_before
    assert parallel_state.model_parallel_is_initialized() == mpu_before


@pytest.mark.parametrize("tp_rank", range(TP))
def test_tp8_rank_shapes(tp_rank, bases):
    model = rank_model(SHAPE, tp=TP, pp=1, tp_rank=tp_rank, pp_rank=0, bases=bases)
    params = dict(model.named_parameters())
    got = {name: tuple(p.shape) for name, p in params.items()}
    # One layer compared name by name, then the whole model (all 80 layers, embedding, output).
    layer0 = {n[len("decoder.layers.0."):]: s for n, s in got.items() if n.startswith("decoder.layers.0.")}
    assert layer0 == layer_weights(TP)
    assert got == expected_rank_shapes(TP, VOCAB_PADDED, LAYERS)
    assert all(p.is_meta for p in params.values())

    # How megatron shards each weight (the optimizer and checkpoints rely on these attributes).
    partition_dim = {"linear_qkv": 0, "linear_fc1": 0, "word_embeddings": 0, "output_layer": 0,
                     "linear_proj": 1, "linear_fc2": 1}
    for name, p in params.items():
        kind = name.split(".")[-2]
        if kind in partition_dim:
            assert p.tensor_model_parallel and p.partition_dim == partition_dim[kind], name
        else:
            assert kind.endswith("layernorm") and not getattr(p, "tensor_model_parallel", False), name

    rows = VOCAB_PADDED // TP
    emb = model.embedding.word_embeddings
    assert (emb.vocab_start_index, emb.vocab_end_index) == (tp_rank * rows, (tp_rank + 1) * rows)
    for layer in model.decoder.layers:
        attention = layer.self_attention
        assert isinstance(attention, HarpeSelfAttention)
        assert attention.num_attention_heads_per_partition == HEADS // TP
        assert attention.num_query_groups_per_partition == GROUPS // TP


@pytest.mark.parametrize("tp_rank", range(TP))
def test_tp8_rank_holds_its_group_base(tp_rank, bases):
    rope = rank_model(SHAPE, tp=TP, pp=1, tp_rank=tp_rank, pp_rank=0, bases=bases, num_layers=1).rotary_pos_emb
    base = bases[tp_rank]
    assert rope.bases == list(bases)
    assert rope.local_bases == [base]

    i = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    plain = (1.0 / base ** (2 * i / HEAD_DIM)).to(torch.float32)
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.device.type == "cpu"
    assert rope.inv_freq.shape == (1, HEAD_DIM // 2)
    # float32 pow rounds: within 2 ulp of the float64 value, and bit for bit megatron's own table for this base.
    torch.testing.assert_close(rope.inv_freq[0], plain, rtol=2.5e-7, atol=0)
    megatron = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=base,
                               use_cpu_initialization=True, cp_group=FakeProcessGroup._create_internal(0, 1))
    assert torch.equal(rope.inv_freq[0], megatron.inv_freq)

    # Materialized frequencies (the unfused path's provider): 8 query heads and 1 key group on this rank, all with
    # the group's base.
    seq = 16
    unfused = rank_model(SHAPE, tp=TP, pp=1, tp_rank=tp_rank, pp_rank=0, bases=bases, num_layers=1,
                         harpe_rope_impl="unfused").rotary_pos_emb
    query, key = unfused(seq)
    assert query.shape == (seq, 1, HEADS // TP, HEAD_DIM)
    assert key.shape == (seq, 1, GROUPS // TP, HEAD_DIM)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), plain)
    expected = torch.cat([angles, angles], dim=-1)  # rotate-half layout
    torch.testing.assert_close(key[:, 0, 0], expected, rtol=2.5e-7, atol=0)
    for head in range(HEADS // TP):
        assert torch.equal(query[:, 0, head], key[:, 0, 0])

    # Context parallelism 2: rank 1 holds chunks 1 and 2 of 4 (positions 4..11).
    query_cp, key_cp = unfused(seq, cp_group=FakeProcessGroup._create_internal(1, 2))
    assert query_cp.shape == (seq // 2, 1, HEADS // TP, HEAD_DIM)
    assert torch.equal(key_cp[:, 0, 0], key[4:12, 0, 0])

    # HARPE's kernels (the model's default path): positions and the [groups_local, d/2] table.
    positions, table = rope(seq)
    assert torch.equal(positions, torch.arange(seq, dtype=torch.float32))
    assert torch.equal(table, rope.inv_freq)


def test_tp8_ranks_cover_all_bases_in_order(bases):
    held = []
    for tp_rank in range(TP):
        held += rank_model(SHAPE, tp=TP, pp=1, tp_rank=tp_rank, pp_rank=0, bases=bases, num_layers=1).rotary_pos_emb.local_bases
    assert held == list(bases)


def test_tp8_parameter_counts_add_up_to_llama2_70b():
    replicated_per_rank = (2 * LAYERS + 1) * H  # two RMSNorms per layer and the final one
    sharded_per_rank = (llama2_70b_parameters(VOCAB_PADDED) - replicated_per_rank) // TP
    total = 0
    for tp_rank in range(TP):
        model = rank_model(SHAPE, tp=TP, pp=1, tp_rank=tp_rank, pp_rank=0)
        sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
        replicated = sum(p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
        assert (sharded, replicated) == (sharded_per_rank, replicated_per_rank)
        total += sharded + (replicated if tp_rank == 0 else 0)
        assert rank_parameter_count(SHAPE, TP, 1, tp_rank, 0, VOCAB) == sharded_per_rank + replicated_per_rank
    assert total == llama2_70b_parameters(VOCAB_PADDED)
    assert total == LLAMA2_70B_PARAMETERS + 2 * (VOCAB_PADDED - VOCAB) * H  # padding rows: embedding and output


def test_pp4_stages():
    pp, tp_rank, per_stage = 4, 5, LAYERS // 4
    counts = []
    for pp_rank in range(pp):
        model = rank_model(SHAPE, tp=TP, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank)
        first, last = pp_rank == 0, pp_rank == pp - 1
        assert len(model.decoder.layers) == per_stage
        assert [layer.layer_number for layer in model.decoder.layers] == list(
            range(pp_rank * per_stage + 1, (pp_rank + 1) * per_stage + 1))
        assert hasattr(model, "embedding") == first
        assert hasattr(model, "output_layer") == last
        assert (model.decoder.final_layernorm is not None) == last
        got = {name: tuple(p.shape) for name, p in model.named_parameters()}
        assert got == expected_rank_shapes(TP, VOCAB_PADDED, per_stage, pre_process=first, post_process=last)
        assert model.rotary_pos_emb.local_bases == [10000.0]
        counts.append(rank_parameter_count(SHAPE, TP, pp, tp_rank, pp_rank, VOCAB))
    assert sum(counts) == rank_parameter_count(SHAPE, TP, 1, tp_rank, 0, VOCAB)
    assert counts[1] == counts[2] == per_stage * sum(math.prod(s) for s in layer_weights(TP).values())


def test_tp16_is_refused_with_a_clear_error(bases):
    # megatron's config allows TP=16 with 8 groups (it replicates K/V); HARPE needs whole groups per rank.
    dist_before = torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"num_query_groups \(8\) is not divisible by tensor_model_parallel_size "
                                         r"\(16\).*choose a TP size that divides 8"):
        rank_model(SHAPE, tp=16, pp=1, tp_rank=3, pp_rank=0, bases=bases, num_layers=1)
    assert torch.distributed.is_initialized() == dist_before
