"""HarpeGPTModel under Megatron's parallelism equals the same model on one rank.

Every scenario runs in spawned gloo processes. Each worker first runs the reference (TP=PP=CP=1) model,
then re-initializes megatron's parallel_state for the scenario, loads its slice of the same weights
(megatron_harpe.sharding), runs the same microbatches through megatron's forward_backward_func and
compares per-token losses and every parameter gradient with the matching slice of the reference.
"""

from functools import partial

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.distributed import init_model_parallel, spawn
from megatron_harpe.positions import cp_local_indices, packed_local_coordinates
from megatron_harpe.sharding import local_view, load_full_state_dict
from utils import tiny_config, tiny_model, tokens

pytestmark = pytest.mark.multirank

SEQ, MICROBATCHES = 16, 2
PACKED_LENGTHS = [8, 4, 12]  # each divisible by 2 * CP


def config(tp=1, pp=1, cp=1):
    # Losses are sums over tokens: megatron then neither divides by the (CP-local) token count nor by
    # the number of microbatches, so gradients are comparable across CP sizes.
    return tiny_config(tp=tp, pp=pp, cp=cp, calculate_per_token_loss=True)


def _loss_func(per_token_loss):
    return per_token_loss.sum(), torch.tensor(per_token_loss.numel()), {"per_token": per_token_loss.detach()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], None, None, labels=batch["labels"], packed_seq_params=batch.get("packed"))
    return out, _loss_func


def run(model, batches, seq_length):
    """forward_backward_func over the batches; returns (per-token losses or None, grads by name)."""
    model.zero_grad()
    with megatron_on_cpu():
        results = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=batches[0]["tokens"].size(0),
        )
    cp_group = parallel_state.get_context_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if cp_group.size() > 1:  # each CP rank saw part of every sequence (DDP does this in training)
            torch.distributed.all_reduce(grad, group=cp_group)
        grads[name] = grad
    losses = [r["per_token"] for r in results] if parallel_state.is_pipeline_last_stage() else None
    return losses, grads


def plain_batches():
    out = []
    for i in range(MICROBATCHES):
        ids = tokens(2, SEQ, seed=10 + i)
        out.append({"tokens": ids, "labels": torch.roll(ids, -1, dims=1)})
    return out


def cp_slice(batches, cp_rank, cp_size):
    idx = cp_local_indices(SEQ, cp_rank, cp_size)
    return [{k: v[:, idx] for k, v in b.items()} for b in batches]


def packed_sequences():
    seqs = [tokens(1, n, seed=20 + i) for i, n in enumerate(PACKED_LENGTHS)]
    return [{"tokens": s, "labels": torch.roll(s, -1, dims=1)} for s in seqs]


def packed_batch(seqs, cp_rank, cp_size):
    cu = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    seq_id, pos = packed_local_coordinates(cu, cp_rank, cp_size)
    take = lambda key: torch.stack([seqs[s][key][0, p] for s, p in zip(seq_id.tolist(), pos.tolist())])[None]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=max(PACKED_LENGTHS),
                             max_seqlen_kv=max(PACKED_LENGTHS))
    return [{"tokens": take("tokens"), "labels": take("labels"), "packed": params}], (seq_id, pos)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _parity_worker(rank, world_size, scenarios):
    init_model_parallel(1, 1, 1)
    reference = tiny_model(config())
    full = {n: p.detach().clone() for n, p in reference.named_parameters()}
    ref_losses, ref_grads = run(reference, plain_batches(), SEQ)
    seqs = packed_sequences()
    ref_packed_losses, ref_packed_grads = run(reference, seqs, None)

    for tp, pp, cp, packed, rope_impl in scenarios:
        label = f"TP={tp} PP={pp} CP={cp}{' packed THD' if packed else ''} RoPE {rope_impl} rank {rank}"
        init_model_parallel(tp, pp, cp)
        tp_rank, cp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank()
        model = tiny_model(config(tp, pp, cp), harpe_rope_impl=rope_impl)
        load_full_state_dict(model, full, tp_rank, tp, gated_linear_unit=True)
        if packed:
            batches, (seq_id, pos) = packed_batch(seqs, cp_rank, cp)
            losses, grads = run(model, batches, None)
            expected_losses = [torch.stack([ref_packed_losses[s][0, p] for s, p in zip(seq_id.tolist(), pos.tolist())])[None]]
            expected_grads = ref_packed_grads
        else:
            losses, grads = run(model, cp_slice(plain_batches(), cp_rank, cp), SEQ)
            idx = cp_local_indices(SEQ, cp_rank, cp)
            expected_losses = [l[:, idx] for l in ref_losses]
            expected_grads = ref_grads
        if losses is not None:
            for got, want in zip(losses, expected_losses, strict=True):
                close(got, want, f"{label} per-token loss")
        expected_view = local_view(model, expected_grads, tp_rank, tp, gated_linear_unit=True)
        for name, grad in grads.items():
            close(grad, expected_view[name], f"{label} grad of {name}")


def test_tp2_pp2_cp2_and_packed_thd_cp2_equal_one_rank():
    spawn(_parity_worker, 2, [(2, 1, 1, False, "auto"), (1, 2, 1, False, "auto"), (1, 1, 2, False, "auto"),
                              (1, 1, 2, True, "auto"), (2, 1, 1, True, "auto"), (1, 1, 2, True, "unfused"),
                              (2, 1, 1, False, "unfused")])


def test_tp2_x_cp2_and_tp2_x_pp2_on_four_ranks_equal_one_rank():
    spawn(_parity_worker, 4, [(2, 1, 2, False, "auto"), (2, 2, 1, False, "auto")])
