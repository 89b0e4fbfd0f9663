"""HarpeSelfAttention with packed (THD) batches split over a context-parallel group the micro-batch brings, fusion
flags switched on late, and a provider built for another RoPE path.

megatron's dynamic (hybrid) CP hands each micro-batch its CP group in ``packed_seq_params.cp_group``;
Transformer Engine's attention follows it, so HARPE's RoPE positions and the CPU core attention must too.
"""

import dataclasses
import itertools

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harpe import self_attention
from megatron_harpe.distributed import init_model_parallel, spawn
from megatron_harpe.positions import packed_local_coordinates
from megatron_harpe.rotary import HarpeRotaryEmbedding
from test_rotary import FakeGroup
from utils import TINY_BASES, VOCAB, tiny_config, tiny_model, tokens

LENGTHS, PADDED = [6, 3, 7], [8, 4, 8]  # padded to multiples of 2 * CP; 8 > max_seqlen = 7


def packed(lengths, padded_lengths, **kwargs):
    cu, cu_padded = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lengths, padded_lengths))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths),
                           **kwargs)


class _Stop(Exception):
    pass


@pytest.mark.usefixtures("megatron_single_process")
def test_rope_positions_follow_the_micro_batch_cp_group(monkeypatch):
    # parallel_state has CP = 1; the micro-batch says it is rank 1 of a CP group of 2.
    seen = []

    def record(query, key, positions, *args, **kwargs):
        seen.append((query.size(0), positions.tolist()))
        raise _Stop  # the core attention would all-gather over the (fake) group

    monkeypatch.setattr(self_attention, "harpe_rope_qk", record)
    model = tiny_model(tiny_config()).eval()
    with pytest.raises(_Stop):
        model(tokens(1, 12), None, None, packed_seq_params=packed([8, 4, 12], [8, 4, 12], cp_group=FakeGroup(1, 2)))
    # Rank 1 of 2 holds chunks 1 and 2 of each sequence (chunk = length / 4), positions restarting per sequence.
    assert seen == [(12, [2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])]


def _loss_weights(n):
    return torch.linspace(-1, 1, n * VOCAB).view(1, n, VOCAB)


def _dynamic_cp_worker(rank, world_size):
    init_model_parallel(1, 1, 1)  # no CP in parallel_state: every rank is a data-parallel replica
    group = torch.distributed.new_group(list(range(world_size)))
    model = tiny_model(tiny_config()).train()  # same seed on every rank: same weights
    seqs = [tokens(1, n, seed=i) for i, n in enumerate(LENGTHS)]
    ids = torch.cat([torch.cat([s, torch.zeros(1, p - n, dtype=s.dtype)], dim=1)
                     for s, n, p in zip(seqs, LENGTHS, PADDED)], dim=1)
    weights = _loss_weights(ids.size(1))

    params = packed(LENGTHS, PADDED)
    reference = model(ids, None, None, packed_seq_params=params)
    (reference * weights).sum().backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # This rank's share in megatron's layout, split over the micro-batch's own CP group.
    seq_id, pos = packed_local_coordinates(params.cu_seqlens_q_padded, rank, world_size)
    index = pos + params.cu_seqlens_q_padded.long()[seq_id]
    local = model(ids[:, index], None, None, packed_seq_params=dataclasses.replace(params, cp_group=group))
    (local * weights[:, index]).sum().backward()
    torch.testing.assert_close(local, reference[:, index], atol=2e-5, rtol=1e-4,
                               msg=lambda m: f"rank {rank} logits: {m}")
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=group)  # each rank saw part of every sequence
        torch.testing.assert_close(grad, reference_grads[name], atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"rank {rank} grad of {name}: {m}")


@pytest.mark.multirank
def test_packed_padded_thd_over_the_micro_batch_cp_group_equals_one_rank():
    spawn(_dynamic_cp_worker, 2)


class _FusedRopeCalled(Exception):
    pass


def _fused_rope(*args, **kwargs):
    raise _FusedRopeCalled("Transformer Engine's fused RoPE was called with HARPE's per-head frequencies")


# megatron's Attention reads the fusion flags at forward time, not at construction (issue 15, item 7).
@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("flag", ["apply_rope_fusion", "fused_single_qkv_rope"])
@pytest.mark.parametrize("rope_impl", ["unfused", "torch"])
def test_rope_fusion_switched_on_after_construction_is_never_used(monkeypatch, flag, rope_impl):
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", _fused_rope)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", _fused_rope)
    monkeypatch.setattr(attention, "apply_fused_qkv_rotary_pos_emb", _fused_rope, raising=False)
    monkeypatch.setattr(attention, "HAVE_FUSED_QKV_ROPE", True)  # as if TE were installed
    config = tiny_config()
    model = tiny_model(config, harpe_rope_impl=rope_impl).eval()
    ids = tokens(2, 16)
    with torch.no_grad():
        expected = model(ids, None, None)
        setattr(config, flag, True)
        assert all(getattr(m.config, flag) for m in model.modules() if isinstance(m, self_attention.HarpeSelfAttention))
        got = model(ids, None, None)
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("megatron_single_process")
def test_a_provider_built_for_another_rope_path_is_refused_clearly():
    # HarpeGPTModel builds the provider and the attentions with one rope_impl; a provider swapped in by hand may not.
    model = tiny_model(tiny_config(), harpe_rope_impl="torch").eval()
    config = model.config
    model.rotary_pos_emb = HarpeRotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, bases=TINY_BASES,
                                                num_attention_heads=config.num_attention_heads,
                                                num_query_groups=config.num_query_groups, rope_impl="unfused")
    with pytest.raises(ValueError, match="built for HARPE's kernels .* same rope_impl"):
        model(tokens(1, 8), None, None)
