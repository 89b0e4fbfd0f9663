"""``pretrain_harpe.py``: Megatron-LM's flags plus ``--harpe-*``; megatron.training on CUDA, the compact engine otherwise."""

from __future__ import annotations

import functools
import logging
import sys

import torch

from megatron_harpe.arguments import HarpeArgumentError, is_rank_zero
from megatron_harpe.command import CommandError, RunError
from megatron_harpe.megatron_args import parse_megatron_args
from megatron_harpe.model import have_te
from megatron_harpe.model_from_args import layer_impl

logger = logging.getLogger(__name__)


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


class RunFailed(RunError, RuntimeError):
    """The run stopped without doing what was asked (the reason was printed before)."""


def load_or_raise(load_checkpoint):
    """megatron's ``load_checkpoint`` ends the process with a bare ``sys.exit()``, status 0, when it cannot load
    (a bad tracker file, an unreadable checkpoint, ``--exit-on-missing-checkpoint``): make that a failure."""

    @functools.wraps(load_checkpoint)
    def load(*args, **kwargs):
        try:
            return load_checkpoint(*args, **kwargs)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
            from megatron.training import get_args

            given = get_args()
            where = " / ".join(f"{flag} {path}" for flag, path in (("--load", given.load),
                               ("--pretrained-checkpoint", given.pretrained_checkpoint)) if path)
            raise RunFailed(f"could not load the checkpoint ({where}; megatron's reason is printed above): fix the "
                            "path or the checkpoint, or drop the flag to start from scratch") from None

    return load


def _run_megatron(args) -> None:
    """megatron.training.pretrain with our providers; it re-reads the command line and sets its globals."""
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import pretrain

    from megatron_harpe.training.data import train_valid_test_datasets_provider
    from megatron_harpe.training.forward_step import forward_step
    from megatron_harpe.training.model_provider import model_provider

    use_prebuilt_dataset_helpers()
    training.load_checkpoint = load_or_raise(training.load_checkpoint)
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


def check_only(args) -> None:
    """``--harpe-check-only``: the checks the run would make before it starts anything, for the machine-independent
    part (the engine and Transformer Engine are the launch node's business); the compact engine's flag refusals too."""
    if args.harpe_engine == "compact":
        from megatron_harpe.training.compact import check_compact_args

        check_compact_args(args)


def _report(message: str) -> None:
    """Every rank fails the same way: one copy of the error, from rank 0."""
    if is_rank_zero():
        print(f"pretrain_harpe.py: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--harpe-check-only" in flags:
            args = parse_megatron_args(flags)  # quiet: validate_args prints every argument
            check_only(args)
            print(f"pretrain_harpe.py: the flags fit {args.world_size} rank(s): TP {args.tensor_model_parallel_size}, "
                  f"PP {args.pipeline_model_parallel_size}, CP {args.context_parallel_size}, "
                  f"DP {args.data_parallel_size}", file=sys.stderr)
            return 0
        args = parse_megatron_args(flags, quiet=False)  # megatron's argument dump, as pretrain_gpt.py prints it
        engine = choose_engine(args)
        if engine == "megatron":
            check_megatron_engine_flags(args)
        if engine == "compact":
            from megatron_harpe.training.compact import train

            train(args)  # refuses unsupported flags (a HarpeArgumentError) before it starts anything
        else:
            _run_megatron(args)
    except CommandError as e:  # HarpeArgumentError: 2, RunFailed: 1
        _report(str(e))
        return e.exit_code
    return 0
