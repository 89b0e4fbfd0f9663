"""The memory model: RoPE bytes measured on the real code paths, recompute, pipeline stages, optimizer sharding."""

import pytest
import torch

from megatron_harpe.kernels.saved_bytes import saved_bytes
from megatron_harpe.planning.memory import (BF16, FP32, Layout, estimate_memory, layer_activation_bytes,
                                            layer_input_bytes, rope_bytes)
from megatron_harpe.shape import SHAPES, LlamaShape

SEQ = 131072


def layout(**kw):
    base = dict(tp=4, pp=1, cp=2, dp=1, micro_batch_size=1, num_microbatches=32)
    return Layout(**{**base, **kw})


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (2, 2)])
def test_rope_bytes_equal_what_the_rope_paths_save(tp, cp):
    """HARPE's kernel and megatron's unfused RoPE with per-head frequencies, measured on one layer's q and k."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_harpe.kernels import harpe_rope_qk
    from megatron_harpe.rotary import inverse_frequencies, materialize_frequencies

    shape = LlamaShape(name="t", num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=256)
    seq, d = 512, shape.kv_channels
    heads, groups = shape.num_attention_heads // tp, shape.num_query_groups // tp
    seq_local = seq // cp
    q = torch.randn(seq_local, 1, heads, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(seq_local, 1, groups, d, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq_local, dtype=torch.float32)
    table = inverse_frequencies([1e6 * (g + 1) for g in range(groups)], d)
    q_freqs, k_freqs = materialize_frequencies(positions, table, heads // groups, False)
    plan = layout(tp=tp, cp=cp, num_microbatches=1)

    kernel = saved_bytes(lambda: harpe_rope_qk(q, k, positions, table, impl="torch"))
    assert kernel == rope_bytes(shape, plan, seq, 1, harpe=True, rope_impl="torch")

    unfused = saved_bytes(lambda: (_apply_rotary_pos_emb_bshd(q, q_freqs), _apply_rotary_pos_emb_bshd(k, k_freqs)))
    per_layer = (rope_bytes(shape, plan, seq, 1, harpe=True, rope_impl="unfused")
                 - rope_bytes(shape, plan, seq, 0, harpe=True, rope_impl="unfused"))
    assert unfused == per_layer
    table_bytes = rope_bytes(shape, plan, seq, 0, harpe=True, rope_impl="unfused")
    assert table_bytes == q_freqs.numel() * q_freqs.element_size() + k_freqs.numel() * k_freqs.element_size()


def test_harpe_kernels_hold_less_than_megatrons_rope_and_unfused_much_more():
    shape = SHAPES["7b"]
    kernel = estimate_memory(shape, layout(recompute="full"), SEQ)
    unfused = estimate_memory(shape, layout(recompute="none"), SEQ, rope_impl="unfused")
    # megatron's fused RoPE keeps one fp32 [s/cp, d] table; HARPE keeps s/cp positions and a [groups/tp, d/2] table.
    assert kernel.harpe_overhead == FP32 * (SEQ // 2 + 8 * 64) - FP32 * (SEQ // 2) * 128 < 0
    # Unfused per-head RoPE: bf16 cos and sin for 8 heads and 8 groups per rank, every layer, every micro-batch.
    saved = 32 * 1 * 2 * BF16 * (SEQ // 2) * 16 * 128
    assert unfused.rope == saved + FP32 * (SEQ // 2) * 16 * 128
    assert unfused.harpe_overhead > 2 * 2 ** 30
    baseline = estimate_memory(shape, layout(recompute="full"), SEQ, harpe=False)
    assert baseline.harpe_overhead == 0 and baseline.total - kernel.total == -kernel.harpe_overhead


def test_recompute_trades_activations_for_a_recomputed_layer():
    shape = SHAPES["7b"]
    tokens = SEQ // 2
    none = estimate_memory(shape, layout(recompute="none"), SEQ)
    blocks = [estimate_memory(shape, layout(recompute="block", recompute_layers=k), SEQ) for k in (1, 8, 31)]
    full = estimate_memory(shape, layout(recompute="full"), SEQ)
    stored = [m.activations for m in (none, *blocks, full)]
    assert stored == sorted(stored, reverse=True) and len(set(stored)) == len(stored)
    full_layer, kept_input = layer_activation_bytes(shape, tokens, 4), layer_input_bytes(shape, tokens, 4)
    inputs = tokens * (3 * 8 + 4)
    assert full.activations == 32 * kept_input + inputs
    assert none.activations == 32 * full_layer + inputs
    assert blocks[1].activations == 8 * kept_input + 24 * full_layer + inputs
    # The recomputed layer is rebuilt during backward.
    assert full.workspace - none.workspace == full_layer


def test_pipeline_first_stage_holds_one_microbatch_per_stage():
    shape = SHAPES["70b"]
    many = estimate_memory(shape, layout(tp=8, pp=4, cp=4, recompute="full", num_microbatches=32), SEQ)
    few = estimate_memory(shape, layout(tp=8, pp=4, cp=4, recompute="full", num_microbatches=2), SEQ)
    assert many.stage == 0 and few.stage == 0
    assert many.activations == pytest.approx(2 * few.activations)
    assert many.logits == 0        # the output layer lives on the last stage
    last_only = estimate_memory(shape, layout(tp=8, pp=4, cp=4, recompute="full", num_microbatches=1), SEQ)
    assert last_only.stage == 3 and last_only.logits > 0


def test_distributed_optimizer_shards_over_dp_and_cp():
    shape = SHAPES["13b"]
    for dp, cp in [(1, 1), (4, 1), (2, 4)]:
        m = estimate_memory(shape, layout(tp=8, cp=cp, dp=dp), SEQ)
        assert m.optimizer_replicated == pytest.approx(m.optimizer_distributed * dp * cp)
        assert m.optimizer == m.optimizer_distributed
        plain = estimate_memory(shape, layout(tp=8, cp=cp, dp=dp, distributed_optimizer=False), SEQ)
        assert plain.optimizer == m.optimizer_replicated == 6 * m.weights      # 12 bytes vs bf16's 2
        assert m.gradients == 2 * m.weights                                     # fp32 main gradients


@pytest.mark.parametrize("model,tp,pp", [("70b", 8, 1), ("70b", 8, 4), ("7b", 4, 2), ("13b", 8, 1), ("7b", 1, 1)])
def test_stage_parameters_equal_megatrons_model_on_each_rank(model, tp, pp):
    """The planner's parameter count per GPU against megatron's own per-rank model (meta device)."""
    from meta_model import rank_parameter_count

    from megatron_harpe.planning.memory import stage_parameters

    for stage in sorted({0, pp // 2, pp - 1}):
        counted = rank_parameter_count(SHAPES[model], tp, pp, tp_rank=tp - 1, pp_rank=stage)
        assert stage_parameters(SHAPES[model], tp, pp, stage) == counted, (model, tp, pp, stage)


def test_the_rope_memory_models_take_the_trainers_rope_impls():
    from megatron_harpe.planning.memory import ROPE_MEMORY
    from megatron_harpe.rotary import ROPE_IMPLS

    assert tuple(ROPE_MEMORY) == ROPE_IMPLS
