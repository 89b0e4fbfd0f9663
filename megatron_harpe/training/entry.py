"""``pretrain_harpe.py``: Megatron-LM's flags plus ``--harpe-*``; megatron.training on CUDA, the compact engine otherwise."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import torch

from megatron_harpe.arguments import HarpeArgumentError, add_harpe_args, harpe_enabled, resolve_harpe_args
from megatron_harpe.model import have_te
from megatron_harpe.training.model_provider import layer_impl

logger = logging.getLogger(__name__)


def parse_and_validate(argv: list[str] | None = None):
    """Megatron's ``parse_and_validate_args`` with the HARPE group (without its global set-up), then HARPE's checks.

    As megatron: ``--use-checkpoint-args`` fills the model flags from ``--pretrained-checkpoint`` and ``--load``
    before ``validate_args``; for HARPE it also takes the bases a checkpoint was trained with.
    """
    from megatron.training import arguments as megatron_arguments

    from megatron_harpe.training.data import unsupported_data_flags

    flags = sys.argv[1:] if argv is None else list(argv)
    if any(f == "--yaml-cfg" or f.startswith("--yaml-cfg=") for f in flags):
        # parse_args would swap the parsed flags, --harpe-* included, for a nested namespace nothing here reads.
        raise HarpeArgumentError("--yaml-cfg (Megatron's experimental YAML arguments) ignores every command-line "
                                 "flag, the --harpe-* ones included: pass the flags on the command line")
    saved_argv = sys.argv
    sys.argv = [sys.argv[0], *flags]
    try:
        args = megatron_arguments.parse_args(extra_args_provider=add_harpe_args)
    finally:
        sys.argv = saved_argv
    if args.use_checkpoint_args:
        _args_from_checkpoint(args)
    try:
        _validate_megatron_args(megatron_arguments, args)
    except AssertionError as e:
        # validate_args reports with bare asserts; name the failed check instead of a traceback.
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise HarpeArgumentError(f"Megatron-LM's validate_args rejected the flags: {str(e) or frame.line} "
                                 f"({os.path.basename(frame.filename)}:{frame.lineno})") from None
    problems = unsupported_data_flags(args)
    if problems:
        raise HarpeArgumentError("these flags need a path pretrain_harpe.py does not have:\n  " + "\n  ".join(problems))
    resolve_harpe_args(args)
    return args


def _args_from_checkpoint(args) -> None:
    """``--use-checkpoint-args``: megatron's ``load_args_from_checkpoint``, plus the checkpoint's HARPE bases."""
    from megatron.training.checkpointing import load_args_from_checkpoint

    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.training.checkpoint import CheckpointError, load_checkpoint_args

    if args.load is None and args.pretrained_checkpoint is None:
        raise HarpeArgumentError("--use-checkpoint-args needs --load or --pretrained-checkpoint")
    if harpe_enabled(args):
        raise HarpeArgumentError("--use-checkpoint-args takes the RoPE settings from the checkpoint, the HARPE "
                                 "bases included (as megatron does for --rotary-base): drop the --harpe-* base flags")
    for source in ("pretrained_checkpoint", "load"):  # megatron's order: --load wins
        if getattr(args, source) is None:
            continue
        with megatron_on_cpu():  # it all-reduces the iteration on 'cuda' once a process group exists
            load_args_from_checkpoint(args, load_arg=source)
        try:
            saved = load_checkpoint_args(getattr(args, source))
        except CheckpointError:
            continue  # megatron left the flags as given; so do we
        if getattr(saved, "harpe_bases", None) is not None:
            args.harpe_bases = list(saved.harpe_bases)


def _validate_megatron_args(megatron_arguments, args) -> None:
    if torch.cuda.is_available():
        megatron_arguments.validate_args(args)
    else:
        # validate_args asks the GPU architecture when TP or CP > 1, only to demand
        # CUDA_DEVICE_MAX_CONNECTIONS=1 on pre-Blackwell GPUs; without a GPU there is nothing to demand.
        arch = megatron_arguments.get_device_arch_version
        megatron_arguments.get_device_arch_version = lambda: 10
        try:
            megatron_arguments.validate_args(args)
        finally:
            megatron_arguments.get_device_arch_version = arch


def choose_engine(args) -> str:
    if args.harpe_engine == "auto":
        return "megatron" if torch.cuda.is_available() else "compact"
    if args.harpe_engine == "megatron" and not torch.cuda.is_available():
        raise HarpeArgumentError("--harpe-engine megatron needs CUDA (megatron.training asserts it); "
                                 "use --harpe-engine compact on a CPU")
    return args.harpe_engine


def check_megatron_engine_flags(args) -> None:
    """What megatron.training needs before it starts: the layer spec's libraries, and without Transformer Engine
    (or apex) no fusion that only they provide. Said up front, instead of an assertion deep in the model build."""
    layer_impl(args)
    if have_te():
        return
    needed = [flag for flag, on in (("--no-rope-fusion", args.apply_rope_fusion),
                                    ("--no-gradient-accumulation-fusion", args.gradient_accumulation_fusion),
                                    ("--no-persist-layer-norm", not args.no_persist_layer_norm)) if on]
    if needed:
        raise HarpeArgumentError("without Transformer Engine the local spec cannot use the fused kernels Megatron "
                                 f"turns on by default: add {' '.join(needed)}")


def use_prebuilt_dataset_helpers() -> None:
    """megatron.training runs ``make`` in megatron/core/datasets at start-up; the megatron-core wheel ships the
    compiled ``helpers_cpp`` and no Makefile, so that make fails and megatron exits 1. Build only when the
    compiled helpers do not import (a source checkout)."""
    from megatron.core.datasets import utils as dataset_utils

    build = dataset_utils.compile_helpers

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            build()

    dataset_utils.compile_helpers = compile_helpers


def _run_megatron(args) -> None:
    """megatron.training.pretrain with our providers; it re-reads the command line and sets its globals."""
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import pretrain

    from megatron_harpe.training.data import train_valid_test_datasets_provider
    from megatron_harpe.training.forward_step import forward_step
    from megatron_harpe.training.model_provider import model_provider

    use_prebuilt_dataset_helpers()
    set_global_variables(args)
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider, get_embedding_ranks=embedding_ranks)


def embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """pretrain_gpt.py's ``get_embedding_ranks``: the last stage holds word embeddings only when they are tied."""
    from megatron.training import get_args

    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not get_args().untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return ranks


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_and_validate(argv)
        engine = choose_engine(args)
        if engine == "megatron":
            check_megatron_engine_flags(args)
        if engine == "compact":
            from megatron_harpe.training.compact import train

            train(args)  # refuses unsupported flags (a HarpeArgumentError) before it starts anything
        else:
            _run_megatron(args)
    except HarpeArgumentError as e:
        print(f"pretrain_harpe.py: error: {e}", file=sys.stderr)
        return 2
    return 0
