"""The one way into Megatron-LM's argument parser: ``pretrain_harpe.py``'s flags, parsed and validated.

megatron's ``parse_args`` reads ``sys.argv`` and the job from the environment (``WORLD_SIZE``, ``RANK``), and
``validate_args`` prints every argument. :func:`parse_megatron_args` sets what it is given, and puts ``sys.argv``,
the environment and stdout back in one ``finally``, so the trainer, conversion and the planner parse the same way
and a failed parse leaks nothing into the caller. torch and megatron are imported inside: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from collections.abc import Iterator


def parse_megatron_args(argv: list[str], *, world_size: int | None = None, rank: int | None = None,
                        local_world_size: int | None = None, quiet: bool = True) -> argparse.Namespace:
    """Megatron's ``parse_and_validate_args`` with the HARPE group (without its global set-up), then HARPE's checks.

    ``world_size``, ``rank`` and ``local_world_size`` describe the job the flags are checked against (torchrun's
    ``WORLD_SIZE``, ``RANK``, ``LOCAL_WORLD_SIZE``); None keeps the process's own, except that a job given by its
    ``world_size`` is seen from rank 0. ``quiet`` drops what ``validate_args`` prints.

    As megatron: ``--use-checkpoint-args`` fills the model flags from ``--pretrained-checkpoint`` and ``--load``
    before ``validate_args``; for HARPE it also takes the bases a checkpoint was trained with. The layout and the
    HARPE bases are checked before ``validate_args``, which ends by printing every argument: an error comes first.
    A wrong flag exits 2 with one line (megatron's parser would print its whole usage).
    """
    if world_size is not None and rank is None:
        rank = 0
    env = {"WORLD_SIZE": world_size, "RANK": rank, "LOCAL_WORLD_SIZE": local_world_size}
    with _swapped(list(argv), {k: str(v) for k, v in env.items() if v is not None}, quiet):
        return _parse_and_validate(list(argv))


@contextlib.contextmanager
def _swapped(argv: list[str], env: dict[str, str], quiet: bool) -> Iterator[None]:
    saved_argv, saved_stdout = sys.argv, sys.stdout
    saved_env = {k: os.environ.get(k) for k in env}
    try:
        sys.argv = [sys.argv[0] if sys.argv else "pretrain_harpe.py", *argv]
        os.environ.update(env)
        if quiet:
            sys.stdout = io.StringIO()
        yield
    finally:
        sys.argv, sys.stdout = saved_argv, saved_stdout
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse_and_validate(flags: list[str]) -> argparse.Namespace:
    from megatron.training import arguments as megatron_arguments

    from megatron_harpe.arguments import (HarpeArgumentError, add_harpe_args, check_parallel_layout, one_line_errors,
                                          resolve_harpe_args)

    if any(f == "--yaml-cfg" or f.startswith("--yaml-cfg=") for f in flags):
        # parse_args would swap the parsed flags, --harpe-* included, for a nested namespace nothing here reads.
        raise HarpeArgumentError("--yaml-cfg (Megatron's experimental YAML arguments) ignores every command-line "
                                 "flag, the --harpe-* ones included: pass the flags on the command line")
    args = megatron_arguments.parse_args(extra_args_provider=lambda p: one_line_errors(add_harpe_args(p)))
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


def _local_world_size() -> int | None:
    """Ranks per node as torchrun sets them (None outside torchrun)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def _args_from_checkpoint(args: argparse.Namespace) -> None:
    """``--use-checkpoint-args``: megatron's ``load_args_from_checkpoint``, plus the checkpoint's HARPE bases."""
    from megatron.training.checkpointing import load_args_from_checkpoint

    from megatron_harpe.arguments import HarpeArgumentError, harpe_enabled
    from megatron_harpe.checkpoint_layout import CheckpointError, load_checkpoint_args
    from megatron_harpe.cpu_compat import megatron_on_cpu

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


def _validate_megatron_args(megatron_arguments, args: argparse.Namespace) -> None:
    import torch

    if torch.cuda.is_available():
        megatron_arguments.validate_args(args)
        return
    # validate_args asks the GPU architecture when TP or CP > 1, only to demand
    # CUDA_DEVICE_MAX_CONNECTIONS=1 on pre-Blackwell GPUs; without a GPU there is nothing to demand.
    arch = megatron_arguments.get_device_arch_version
    megatron_arguments.get_device_arch_version = lambda: 10
    try:
        megatron_arguments.validate_args(args)
    finally:
        megatron_arguments.get_device_arch_version = arch


def unsupported_data_flags(args: argparse.Namespace) -> list[str]:
    """``flag: what to do`` for every flag ``pretrain_gpt.py`` honours through a path this package does not have."""
    problems = []

    def refuse(condition, flag, what_to_do):
        if condition:
            problems.append(f"{flag}: {what_to_do}")

    refuse(getattr(args, "sft", False), "--sft", "SFT datasets are not part of HARPE continual pretraining; "
           "use Megatron-LM's pretrain_gpt.py")
    refuse(getattr(args, "fim_data", False), "--fim-data", "fill-in-the-middle data is not part of HARPE continual "
           "pretraining; drop it")
    refuse(getattr(args, "hybrid_context_parallel", False), "--hybrid-context-parallel",
           "HARPE positions follow Megatron's fixed CP layout; use --context-parallel-size")
    refuse(getattr(args, "mtp_num_layers", None), "--mtp-num-layers", "multi-token prediction is not part of "
           "Llama-2; drop it")
    refuse(getattr(args, "logits_load_dir", None), "--logits-load-dir", "cached-logit distillation is not "
           "supported; drop it")
    refuse(getattr(args, "dataloader_inter_document_masking", False) and args.context_parallel_size > 1,
           "--dataloader-inter-document-masking with --context-parallel-size > 1",
           "megatron-core 0.19 splits such batches over CP ranks per sequence (use_per_sequence_balancing) while "
           "THD RoPE, megatron's and HARPE's, splits every document into 2*CP chunks, so positions would not match "
           "the tokens; use --context-parallel-size 1 or drop the flag")
    return problems
