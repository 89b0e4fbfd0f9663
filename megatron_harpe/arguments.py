"""``--harpe-*`` flags on top of Megatron-LM's argument parser, and their validation against the model.

Pass :func:`add_harpe_args` as Megatron's ``extra_args_provider``; after ``validate_args`` call
:func:`resolve_harpe_args`, which checks the flags against the model shape, turns a strategy into a concrete
list of bases and writes that list back to ``args.harpe_bases``. Megatron saves ``args`` in every checkpoint,
so conversion and evaluation read the bases a model was trained with from there
(:func:`harpe_bases_from_args`).

With no ``--harpe-*`` flag the model is megatron's own Llama with standard RoPE (``--rotary-base``,
``--rotary-seq-len-interpolation-factor``, ``--position-embedding-type yarn``): the paper's ABF, PI and YaRN
baselines run through the same entry.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from megatron_harpe.bases import PRESETS, STRATEGIES, parse_bases, select_bases, validate_bases
from megatron_harpe.self_attention import ROPE_IMPLS

logger = logging.getLogger(__name__)

ENGINES = ("auto", "megatron", "compact")


class HarpeArgumentError(ValueError):
    """A ``--harpe-*`` flag that does not fit the rest of the command line."""


def is_rank_zero() -> bool:
    """Rank 0 of the job as torchrun numbers it (before torch.distributed exists): the one rank that reports."""
    return os.environ.get("RANK", "0") == "0"


def one_line_errors(parser: argparse.ArgumentParser, prog: str = "pretrain_harpe.py") -> argparse.ArgumentParser:
    """A wrong flag gets one line, not argparse's usage first (megatron's is ~800 lines), and only from rank 0."""

    def error(message: str):
        if is_rank_zero():
            sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
        parser.exit(2)

    parser.error = error
    _escape_percent_in_help(parser)
    return parser


def _escape_percent_in_help(parser: argparse.ArgumentParser) -> None:
    """``--help`` works: argparse %-formats every help string, and megatron-core 0.19.2 has one with a bare '%'
    (``--moe-paged-stash-buffer-size-factor-cuda``: "1.10 = 10%)"), so its own ``--help`` raises ValueError."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


def add_harpe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: the HARPE group."""
    group = parser.add_argument_group(title="HARPE (head-adaptive RoPE bases)")
    group.add_argument("--harpe-bases", type=str, default=None,
                       help="one RoPE base per query group: comma-separated numbers or a preset "
                            f"({', '.join(PRESETS)}: the paper's Table 2 for Llama-2-7B)")
    group.add_argument("--harpe-strategy", choices=(*STRATEGIES, "none"), default="none",
                       help="choose the bases at start-up: peak_valley (the paper's Algorithm 1), uniform "
                            "(Eq. 9) or geometric; 'none' (default) with no --harpe-bases trains standard RoPE")
    group.add_argument("--harpe-base-min", type=float, default=1e6, help="smallest base (paper: 1e6)")
    group.add_argument("--harpe-base-max", type=float, default=5e6, help="largest base (paper: 5e6)")
    group.add_argument("--harpe-stride", type=float, default=30000,
                       help="peak_valley candidate stride (paper: 30000)")
    group.add_argument("--harpe-target-length", type=int, default=None,
                       help="tokens the attention waveform covers in the base search (default: --seq-length)")
    group.add_argument("--harpe-descending", action="store_true",
                       help="give the largest base to the first query group (the paper's order ablation)")
    group.add_argument("--harpe-rope-impl", choices=ROPE_IMPLS, default="auto",
                       help="how q and k are rotated: auto (Triton on CUDA, torch elsewhere), torch, triton, "
                            "or unfused (megatron's unfused RoPE with materialized per-head frequencies)")
    group.add_argument("--harpe-engine", choices=ENGINES, default="auto",
                       help="megatron: megatron.training.pretrain (CUDA); compact: the megatron-core loop of "
                            "megatron_harpe.training.compact (CPU or GPU); auto: megatron with CUDA, else compact")
    group.add_argument("--harpe-metrics-file", type=str, default=None,
                       help="compact engine: append one JSON line per logged iteration (loss, lr, grad norm, "
                            "tokens/s) to this file")
    group.add_argument("--harpe-check-only", action="store_true",
                       help="check the flags for the job torchrun would start (WORLD_SIZE ranks, LOCAL_WORLD_SIZE "
                            "per node) and exit: what examples/*.sh run before --dry-run prints or a launch starts")
    group.add_argument("--harpe-tp-across-nodes", action="store_true",
                       help="allow --tensor-model-parallel-size above the GPUs of one node (NVLink domains that span "
                            "nodes); refused by default: TP all-reduces in every layer")
    return parser


def harpe_enabled(args: argparse.Namespace) -> bool:
    return getattr(args, "harpe_bases", None) is not None or getattr(args, "harpe_strategy", "none") != "none"


def num_rope_groups(args: argparse.Namespace) -> int:
    """Query groups (GQA) or attention heads (MHA): one base each."""
    if getattr(args, "group_query_attention", False) and args.num_query_groups:
        return args.num_query_groups
    return args.num_attention_heads


def check_parallel_layout(args: argparse.Namespace, gpus_per_node: Optional[int] = None) -> None:
    """The model shape against the parallel layout and the job's size, one error with what to change.

    Megatron-LM asserts some of these only in the model build (heads and query groups by TP) or in the micro-batch
    calculator (the global batch by MBS x DP); here they are checked before anything starts. ``gpus_per_node``
    (torchrun's LOCAL_WORLD_SIZE) bounds TP unless ``--harpe-tp-across-nodes``.
    """
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    heads, layers, seq = args.num_attention_heads, args.num_layers, args.seq_length
    for flag, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                       ("--context-parallel-size", cp)):
        if size < 1:
            raise HarpeArgumentError(f"{flag} {size} must be at least 1")
    if heads is not None and heads % tp:
        raise HarpeArgumentError(f"{heads} attention heads do not divide by --tensor-model-parallel-size {tp}: "
                                 "choose a TP that divides them")
    if heads is not None and num_rope_groups(args) % tp:
        raise HarpeArgumentError(f"{num_rope_groups(args)} query groups do not divide by "
                                 f"--tensor-model-parallel-size {tp}: choose a TP that divides them")
    if gpus_per_node and tp > gpus_per_node and not getattr(args, "harpe_tp_across_nodes", False):
        raise HarpeArgumentError(f"--tensor-model-parallel-size {tp} is more than the {gpus_per_node} GPUs of a node: "
                                 "TP all-reduces in every layer and belongs inside a node (use PP or CP across nodes, "
                                 "or --harpe-tp-across-nodes where NVLink spans nodes)")
    uneven_pipeline = any(getattr(args, name, None) for name in (
        "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "pipeline_model_parallel_layout",
        "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"))
    if layers is not None and not uneven_pipeline and layers % pp:
        raise HarpeArgumentError(f"{layers} layers do not divide by --pipeline-model-parallel-size {pp}: choose a PP "
                                 "that divides them")
    if seq is not None and cp > 1 and seq % (2 * cp):
        raise HarpeArgumentError(f"--seq-length {seq} does not divide by 2 x --context-parallel-size {cp} (context "
                                 f"parallelism cuts each sequence in {2 * cp} chunks): use a multiple of {2 * cp}")
    model_ranks = tp * pp * cp
    if args.world_size % model_ranks:
        raise HarpeArgumentError(f"{args.world_size} ranks do not divide by TP x PP x CP = {tp} x {pp} x {cp} = "
                                 f"{model_ranks}: launch a multiple of {model_ranks} ranks or change the layout")
    dp = args.world_size // model_ranks
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    if gbs is not None and mbs is not None and gbs % (mbs * dp):
        raise HarpeArgumentError(f"--global-batch-size {gbs} does not divide by --micro-batch-size {mbs} x data "
                                 f"parallel {dp} ({args.world_size} ranks / TP x PP x CP {model_ranks}): use a "
                                 f"multiple of {mbs * dp}")


def resolve_harpe_args(args: argparse.Namespace) -> Optional[list[float]]:
    """Validate the ``--harpe-*`` flags against the model and fix the bases; ``None`` means standard RoPE.

    On return ``args.harpe_bases`` is the list of floats the model is built with (or ``None``).
    Raises :class:`HarpeArgumentError` with what to change.
    """
    if not harpe_enabled(args):
        return None
    strategy = args.harpe_strategy
    bases = args.harpe_bases
    if isinstance(bases, str) and strategy != "none":
        raise HarpeArgumentError(
            f"give either --harpe-bases or --harpe-strategy, not both (got --harpe-bases {bases!r} and "
            f"--harpe-strategy {strategy})")
    if args.position_embedding_type != "rope":
        raise HarpeArgumentError(
            f"HARPE is a RoPE variant: use --position-embedding-type rope (got {args.position_embedding_type!r}); "
            "YaRN and learned positions are baselines without --harpe-* flags")
    if getattr(args, "use_rope_scaling", False):
        raise HarpeArgumentError("--use-rope-scaling (Llama-3 frequency scaling) cannot be combined with HARPE bases")
    groups = num_rope_groups(args)
    tp = args.tensor_model_parallel_size
    if groups % tp:
        raise HarpeArgumentError(
            f"HARPE gives each query group its own base, and tensor parallelism splits whole groups: "
            f"{groups} query groups do not divide by --tensor-model-parallel-size {tp}")
    if not (args.kv_channels or (args.hidden_size and args.num_attention_heads)):
        raise HarpeArgumentError("HARPE needs the model shape: give --hidden-size and --num-attention-heads")
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    try:
        if isinstance(bases, str):
            chosen = parse_bases(bases)
        elif bases is not None:  # already resolved (args read back from a checkpoint)
            chosen = list(bases)
        else:
            target = args.harpe_target_length or args.seq_length or getattr(args, "encoder_seq_length", None)
            chosen = select_bases(groups, strategy, args.harpe_base_min, args.harpe_base_max, head_dim=head_dim,
                                  target_length=target, stride=args.harpe_stride, descending=args.harpe_descending)
        chosen = validate_bases(chosen, groups)
    except ValueError as e:
        raise HarpeArgumentError(str(e)) from None
    if isinstance(bases, str) and args.harpe_descending:
        chosen = sorted(chosen, reverse=True)
    args.harpe_bases = chosen
    if getattr(args, "rank", 0) == 0:  # megatron's parse_args reads RANK; one line per job, not per rank
        logger.info("HARPE bases (%d, one per query group, %s): %s", len(chosen),
                    strategy if strategy != "none" else "given", ", ".join(f"{b:.6g}" for b in chosen))
    return chosen


def harpe_bases_from_args(args: argparse.Namespace) -> Optional[list[float]]:
    """The bases a checkpoint's saved ``args`` were trained with (``None``: standard RoPE)."""
    bases = getattr(args, "harpe_bases", None)
    if bases is None:
        return None
    if isinstance(bases, str):  # saved before resolution; should not happen for our own checkpoints
        return parse_bases(bases)
    return [float(b) for b in bases]
