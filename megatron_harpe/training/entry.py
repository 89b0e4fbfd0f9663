"""``pretrain_harpe.py``: Megatron-LM's flags plus ``--harpe-*``; megatron.training on CUDA, the compact engine otherwise."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import torch

from megatron_harpe.arguments import HarpeArgumentError, add_harpe_args, resolve_harpe_args

logger = logging.getLogger(__name__)


def parse_and_validate(argv: list[str] | None = None):
    """Megatron's ``parse_args`` + ``validate_args`` with the HARPE group, then the HARPE checks."""
    from megatron.training import arguments as megatron_arguments

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = megatron_arguments.parse_args(extra_args_provider=add_harpe_args)
    try:
        _validate_megatron_args(megatron_arguments, args)
    except AssertionError as e:
        # validate_args reports with bare asserts; name the failed check instead of a traceback.
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise HarpeArgumentError(f"Megatron-LM's validate_args rejected the flags: {str(e) or frame.line} "
                                 f"({os.path.basename(frame.filename)}:{frame.lineno})") from None
    resolve_harpe_args(args)
    return args


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


def _run_megatron(args) -> None:
    """megatron.training.pretrain with our providers; it re-reads the command line and sets its globals."""
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import pretrain

    from megatron_harpe.training.data import train_valid_test_datasets_provider
    from megatron_harpe.training.forward_step import forward_step
    from megatron_harpe.training.model_provider import model_provider

    set_global_variables(args)
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_and_validate(argv)
        engine = choose_engine(args)
        if engine == "compact":
            from megatron_harpe.training.compact import train

            train(args)  # refuses unsupported flags (a HarpeArgumentError) before it starts anything
        else:
            _run_megatron(args)
    except HarpeArgumentError as e:
        print(f"pretrain_harpe.py: error: {e}", file=sys.stderr)
        return 2
    return 0
