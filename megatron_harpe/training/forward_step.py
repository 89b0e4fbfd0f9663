"""The forward step and masked language-model loss shared by both engines, as Megatron-LM's ``pretrain_gpt.py``."""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.utils import get_attr_wrapped_model

from megatron_harpe.training.data import get_batch, packed_seq_params_from_batch

# pretrain_gpt.py: a spiky loss is one 10x the largest loss observed.
SPIKY_LOSS_FACTOR = 10


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """Sum of the per-token losses kept by ``loss_mask``, with the token count, validated like ``pretrain_gpt.py``.

    The three-tuple lets megatron's schedules normalise by tokens (over all micro-batches and data-parallel
    ranks with ``--calculate-per-token-loss``, per micro-batch otherwise). Before any reduction the local loss
    goes through megatron's rerun state machine: NaN and Inf are fatal with ``--check-for-nan-in-loss-and-grad``
    (the default), ``--check-for-spiky-loss`` flags a loss 10x the largest seen, and ``--rerun-mode`` decides
    whether a rejected result is re-run to tell a transient fault from a reproducible one.
    """
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(result=loss, rejection_func=reject,
                                                message=f"found {what} in local forward loss calculation",
                                                tolerance=0.0, fatal=True)  # the forward pass is deterministic
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(rerun_state_machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                   context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """``megatron.training.pretrain``'s forward step."""
    from megatron.training import get_args

    args = get_args()
    vp_stage = get_attr_wrapped_model(model, "vp_stage", allow_none=True)
    batch = get_batch(data_iterator, args, vp_stage=vp_stage)
    packed_seq_params = packed_seq_params_from_batch(batch, args.seq_length)
    if packed_seq_params is not None:
        from megatron.training.training import update_seqlen_stats_from_cu_seqlens

        # megatron.training's FLOPs accounting from the real (unpadded) document lengths, as pretrain_gpt.py.
        update_seqlen_stats_from_cu_seqlens(batch["cu_seqlens"].squeeze(0))
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"], packed_seq_params=packed_seq_params)
    return output, partial(loss_func, batch["loss_mask"], model=model)
