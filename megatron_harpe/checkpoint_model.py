"""The model a checkpoint's saved args describe, built in this process to hold weights (not to train).

Conversion writes and reads ``torch_dist`` through a TP=1 model on the meta device (:func:`meta_model`);
:func:`load_model` rebuilds a trained model (HARPE or standard RoPE) on the caller's parallel layout, for evaluation
and tests. Both build on a CPU through :mod:`megatron_harpe.cpu_compat`, and need no Transformer Engine.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from megatron_harpe.checkpoint_layout import (CheckpointError, checkpoint_format, common_state, iteration_dir,
                                              load_torch_dist)
from megatron_harpe.cpu_compat import megatron_on_cpu, prepare_args_for_cpu
from megatron_harpe.distributed import single_process_world


def _build_model(args: argparse.Namespace, pre_process: bool = True, post_process: bool = True):
    from megatron_harpe.model_from_args import build_model

    return build_model(args, pre_process, post_process)


def _args_for_weights(saved: argparse.Namespace, dtype: torch.dtype, local_spec: bool) -> argparse.Namespace:
    """A copy of ``saved`` that builds here: CPU settings without CUDA (the local spec among them), else the local
    spec when ``local_spec`` (it has the same parameters and keys as Transformer Engine's)."""
    args = argparse.Namespace(**vars(saved))
    args.params_dtype = dtype
    if not torch.cuda.is_available():
        prepare_args_for_cpu(args)
    elif local_spec:
        args.transformer_impl = "local"
    return args


def _at_layout(args: argparse.Namespace, tp: int, pp: int, cp: int = 1) -> None:
    """Set the parallel layout, and undo what validate_args derived from the saved one: it resolves
    ``tensor_parallel_num_weight_shards`` to TP x GTP remat (megatron-core's model_parallel_config), which at
    another TP is an error (fewer shards than TP) or a silent weight-remat factor (a multiple of it)."""
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size = tp, pp, cp
    args.tensor_parallel_num_weight_shards, args.gtp_weight_remat_size = None, 1
    args.expert_tensor_parallel_size = None  # TransformerConfig defaults it to TP
    args.expert_tensor_parallel_num_weight_shards, args.expert_gtp_weight_remat_size = None, 1
    args.sequence_parallel = bool(getattr(args, "sequence_parallel", False)) and tp > 1  # as validate_args at TP=1


@contextmanager
def meta_model(args: argparse.Namespace, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The model ``args`` describe at TP=PP=1 in this process (a gloo world of one), every parameter on the meta
    device: its ``sharded_state_dict()`` is the checkpoint layout without storage; give a part of it storage with
    ``module.to_empty(device="cpu")``."""
    args = _args_for_weights(args, dtype, local_spec=True)  # torch_dist keys are the same for both specs
    _at_layout(args, 1, 1)
    args.perform_initialization = False  # nothing to initialise on meta; every weight is loaded or written
    with single_process_world(), megatron_on_cpu():
        with torch.device("meta"):
            model = _build_model(args)
        yield model


def load_model(root: str, iteration: int | None = None, *, rope_impl: str | None = None,
               allow_pickle: bool = False):
    """Rebuild the trained model (HARPE or standard RoPE) on this process's parallel layout and load its weights.

    Needs megatron's ``parallel_state`` initialised; for ``torch_dist`` any TP/PP works (one rank: TP=PP=1), and
    ``allow_pickle``. Returns ``(model, args)``; the model is in eval mode, fp32 on the CPU.
    """
    from megatron.core import parallel_state

    from megatron_harpe.model import have_te

    path = iteration_dir(root, iteration)
    fmt = checkpoint_format(path)
    common = common_state(path, fmt, allow_pickle)
    args = _args_for_weights(common["args"], torch.float32, local_spec=not have_te())
    _at_layout(args, parallel_state.get_tensor_model_parallel_world_size(),
               parallel_state.get_pipeline_model_parallel_world_size(),
               parallel_state.get_context_parallel_world_size())
    if rope_impl is not None:
        args.harpe_rope_impl = rope_impl
    args.bf16 = args.fp16 = False
    with megatron_on_cpu():
        model = _build_model(args, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
        if fmt == "torch_dist":
            state = load_torch_dist({"model": model.sharded_state_dict()}, path, allow_pickle)["model"]
        else:
            if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
                raise CheckpointError("torch-format checkpoints load at the layout they were saved with; "
                                      "reshard with tools/reshard_megatron.py --tp 1 --pp 1, or save with "
                                      "--ckpt-format torch_dist")
            state = common["model"]  # the rank-0 shard read above holds the weights
        result = model.load_state_dict(state, strict=False)
    # Transformer Engine's _extra_state entries may legitimately differ; every weight must be there.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model its args describe: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), args
