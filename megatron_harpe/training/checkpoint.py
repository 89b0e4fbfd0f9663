"""Read Megatron-LM checkpoints (``torch_dist`` or ``torch``) written by either engine, outside the trainer.

The saved ``args`` carry the model shape and the HARPE bases (:mod:`megatron_harpe.arguments`), so a
checkpoint rebuilds the model it was trained as, at any tensor-parallel size for ``torch_dist``
(dist_checkpointing reshards on load).
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Optional

import torch

from megatron.core import dist_checkpointing, parallel_state

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.model import have_te
from megatron_harpe.training.model_provider import build_model

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A directory that is not a readable Megatron checkpoint."""


def iteration_dir(root: str, iteration: Optional[int] = None) -> str:
    """``root/iter_XXXXXXX`` for ``iteration`` (default: the tracker file's latest)."""
    if iteration is None:
        tracker = os.path.join(root, TRACKER)
        if not os.path.isfile(tracker):
            raise CheckpointError(f"{root} has no {TRACKER}: not a Megatron checkpoint directory (or pass an iteration)")
        text = open(tracker).read().strip()
        if text == "release":
            return os.path.join(root, "release")
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
        iteration = int(text)
    path = os.path.join(root, f"iter_{iteration:07d}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist: the checkpoint for iteration {iteration} is missing")
    return path


def checkpoint_format(path: str) -> str:
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if glob.glob(os.path.join(path, "mp_rank_*", "model_optim_rng.pt")):
        return "torch"
    raise CheckpointError(f"{path} holds neither a torch_dist checkpoint (metadata.json) nor a torch one "
                          "(mp_rank_*/model_optim_rng.pt)")


def _torch_shard_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "mp_rank_*", "model_optim_rng.pt")))


def _common_state(path: str, fmt: str) -> dict:
    """The non-sharded state (args, iteration, ...); for ``torch`` format the whole rank-0 shard, weights included."""
    if fmt == "torch_dist":
        common = dist_checkpointing.load_common_state_dict(path)
    else:
        common = torch.load(_torch_shard_files(path)[0], map_location="cpu", weights_only=False)
    if "args" not in common:
        raise CheckpointError(f"{path} carries no saved args; it was not written by Megatron-LM's checkpointing")
    return common


def load_checkpoint_args(root: str, iteration: Optional[int] = None) -> argparse.Namespace:
    """The Megatron ``args`` saved with the checkpoint (model shape, parallel sizes, ``harpe_bases``)."""
    path = iteration_dir(root, iteration)
    return _common_state(path, checkpoint_format(path))["args"]


def load_model(root: str, iteration: Optional[int] = None, *, rope_impl: Optional[str] = None):
    """Rebuild the trained model (HARPE or standard RoPE) on this process's parallel layout and load its weights.

    Needs megatron's ``parallel_state`` initialised; for ``torch_dist`` any TP/PP works (one rank: TP=PP=1).
    Returns ``(model, args)``; the model is in eval mode, fp32 on the CPU.
    """
    path = iteration_dir(root, iteration)
    fmt = checkpoint_format(path)
    common = _common_state(path, fmt)
    args = argparse.Namespace(**vars(common["args"]))
    args.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    args.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    args.context_parallel_size = parallel_state.get_context_parallel_world_size()
    if rope_impl is not None:
        args.harpe_rope_impl = rope_impl
    if not torch.cuda.is_available():
        from megatron_harpe.training.compact import prepare_args_for_cpu

        prepare_args_for_cpu(args)
    elif not have_te():  # reading weights, not training: the local spec has the same parameters and keys
        args.transformer_impl = "local"
    args.bf16 = args.fp16 = False
    args.params_dtype = torch.float32
    with megatron_on_cpu():
        model = build_model(args, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
        if fmt == "torch_dist":
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
        else:
            if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
                raise CheckpointError("torch-format checkpoints load at the layout they were saved with; "
                                      "reshard with tools/reshard_megatron.py --tp 1 --pp 1, or save with --ckpt-format torch_dist")
            state = common["model"]  # the rank-0 shard read above holds the weights
        result = model.load_state_dict(state, strict=False)
    # Transformer Engine's _extra_state entries may legitimately differ; every weight must be there.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model its args describe: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), args
