"""The forward step and masked language-model loss shared by both engines (as Megatron-LM's ``pretrain_gpt.py``)."""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.utils import get_attr_wrapped_model

from megatron_harpe.training.data import get_batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of the per-token losses kept by ``loss_mask``, with the token count.

    The three-tuple lets megatron's schedules normalise by tokens (over all micro-batches and data-parallel
    ranks with ``--calculate-per-token-loss``, per micro-batch otherwise), exactly as ``pretrain_gpt.py``.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """``megatron.training.pretrain``'s forward step."""
    from megatron.training import get_args

    vp_stage = get_attr_wrapped_model(model, "vp_stage", allow_none=True)
    batch = get_batch(data_iterator, get_args(), vp_stage=vp_stage)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])
