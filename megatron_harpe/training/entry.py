"""``pretrain_harpe.py``: Megatron-LM's flags plus ``--harpe-*``; megatron.training on CUDA, the compact engine otherwise."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import traceback

import torch

from megatron_harpe.arguments import (HarpeArgumentError, add_harpe_args, check_parallel_layout, harpe_enabled,
                                      is_rank_zero, one_line_errors, resolve_harpe_args)
from megatron_harpe.model import have_te
from megatron_harpe.training.model_provider import layer_impl

logger = logging.getLogger(__name__)


def parse_and_validate(argv: list[str] | None = None):
    """Megatron's ``parse_and_validate_args`` with the HARPE group (without its global set-up), then HARPE's checks.

    As megatron: ``--use-checkpoint-args`` fills the model flags from ``--pretrained-checkpoint`` and ``--load``
    before ``validate_args``; for HARPE it also takes the bases a checkpoint was trained with. The layout and the
    HARPE bases are checked before ``validate_args``, which ends by printing every argument: an error comes first.
    A wrong flag exits 2 with one line (megatron's parser would print its whole usage).
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
        args = megatron_arguments.parse_args(extra_args_provider=lambda p: one_line_errors(add_harpe_args(p)))
    finally:
        sys.argv = saved_argv
    if args.use_checkpoint_args:
        _args_from_checkpoint(args)
    check_parallel_layout(args, gpus_per_node=_local_world_size())
    resolve_harpe_args(args)
    if args.attention_backend.name == "local" and not args.spec:
        # validate_args reads args.spec[0] here and raises TypeError without --spec
        raise HarpeArgumentError("--attention-backend local is megatron's --spec local core attention, which "
                                 "pretrain_harpe.py does not build: use --transformer-impl local for the local spec, "
                                 "or --attention-backend flash, fused, unfused or auto")
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
    return args


def _local_world_size():
    """Ranks per node as torchrun sets them (None outside torchrun)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


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
            # megatron's load_args_from_checkpoint has just unpickled the same files: nothing new is trusted here.
            saved = load_checkpoint_args(getattr(args, source), allow_pickle=True)
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


class RunFailed(RuntimeError):
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
            with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
                args = parse_and_validate(flags)
                check_only(args)
            print(f"pretrain_harpe.py: the flags fit {args.world_size} rank(s): TP {args.tensor_model_parallel_size}, "
                  f"PP {args.pipeline_model_parallel_size}, CP {args.context_parallel_size}, "
                  f"DP {args.data_parallel_size}", file=sys.stderr)
            return 0
        args = parse_and_validate(flags)
        engine = choose_engine(args)
        if engine == "megatron":
            check_megatron_engine_flags(args)
        if engine == "compact":
            from megatron_harpe.training.compact import train

            train(args)  # refuses unsupported flags (a HarpeArgumentError) before it starts anything
        else:
            _run_megatron(args)
    except HarpeArgumentError as e:
        _report(str(e))
        return 2
    except RunFailed as e:
        _report(str(e))
        return 1
    return 0
