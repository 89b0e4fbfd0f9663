"""``--harpe-*`` flags on top of Megatron-LM's argument parser, and their validation against the model.

The base-selection flags are declared once, by :func:`add_harpe_base_arguments` (the trainer's ``--harpe-*``,
conversion's, select_bases' ``--bases``/``--strategy``), and read back by :func:`resolve_harpe_bases`.

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
from functools import partial

from megatron_harpe.bases import PRESETS, STRATEGIES, parse_bases, select_bases, validate_bases
from megatron_harpe.command import UsageError

logger = logging.getLogger(__name__)

ENGINES = ("auto", "megatron", "compact")


class HarpeArgumentError(UsageError):  # a ValueError too, as before
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


# What a strategy's search uses when its flag is not given (the paper's values).
SEARCH_DEFAULTS = {"base_min": 1e6, "base_max": 5e6, "stride": 30000.0}
SEARCH_FLAGS = ("base_min", "base_max", "stride", "target_length", "descending")


def _flag(prefix: str, name: str) -> str:
    return prefix + name.replace("_", "-")


def _value(args: argparse.Namespace, prefix: str, name: str):
    return getattr(args, prefix.lstrip("-").replace("-", "_") + name, None)


def add_harpe_base_arguments(parser_or_group, *, prefix: str = "--harpe-", search_defaults: bool = True,
                             target_length: bool = True, neither: str = "standard RoPE") -> None:
    """The base-selection flags, declared once for every command that chooses bases; read them back with
    :func:`resolve_harpe_bases` (same ``prefix`` and ``search_defaults``).

    ``search_defaults``: the trainer's flags carry the paper's values (megatron saves them in every checkpoint's
    args) and a search flag beside a list is unused; without it they default to None, --bases and --strategy
    exclude each other, and a search flag the chosen source does not read is refused (conversion, select_bases).
    ``target_length=False`` leaves ``{prefix}target-length`` to a tool that declares its own; ``neither`` says (in
    the help) what a command line without bases or strategy means.
    """
    flag = partial(_flag, prefix)
    bases_help = ("one RoPE base per query group: comma-separated numbers or a preset "
                  f"({', '.join(PRESETS)}: the paper's Table 2 for Llama-2-7B)")
    strategy_help = ("choose the bases: peak_valley (the paper's Algorithm 1), uniform (Eq. 9) or geometric; "
                     f"neither {flag('bases')} nor a strategy: {neither}")
    if search_defaults:
        parser_or_group.add_argument(flag("bases"), type=str, default=None, help=bases_help)
        parser_or_group.add_argument(flag("strategy"), choices=(*STRATEGIES, "none"), default="none",
                                     help=strategy_help + " ('none', the default)")
    else:
        source = parser_or_group.add_mutually_exclusive_group()
        source.add_argument(flag("bases"), type=str, default=None, help=bases_help)
        source.add_argument(flag("strategy"), choices=STRATEGIES, default=None, help=strategy_help)
    default = SEARCH_DEFAULTS if search_defaults else dict.fromkeys(SEARCH_DEFAULTS)
    parser_or_group.add_argument(flag("base_min"), type=float, default=default["base_min"],
                                 help="smallest base of a strategy's search (paper: 1e6)")
    parser_or_group.add_argument(flag("base_max"), type=float, default=default["base_max"],
                                 help="largest base of a strategy's search (paper: 5e6)")
    parser_or_group.add_argument(flag("stride"), type=float, default=default["stride"],
                                 help="peak_valley candidate stride (paper: 30000)")
    if target_length:
        parser_or_group.add_argument(flag("target_length"), type=int, default=None,
                                     help="tokens the attention waveform covers in the base search "
                                          "(default: --seq-length)")
    parser_or_group.add_argument(flag("descending"), action="store_true",
                                 default=False if search_defaults else None,
                                 help="give the largest base to the first query group (the paper's order ablation)")


def resolve_harpe_bases(args: argparse.Namespace, num_query_groups: int | None, head_dim: int,
                        target_length: int | None, *, prefix: str = "--harpe-",
                        search_defaults: bool = True) -> list[float] | None:
    """The bases :func:`add_harpe_base_arguments`' flags ask for (``None``: neither a list nor a strategy).

    ``num_query_groups``: how many the model needs (``None``: a list may hold any number); ``target_length``: what
    the search covers unless ``{prefix}target-length`` says otherwise. Raises :class:`HarpeArgumentError` with what
    to change.
    """
    flag = partial(_flag, prefix)
    bases, strategy = _value(args, prefix, "bases"), _value(args, prefix, "strategy")
    strategy = None if strategy == "none" else strategy
    if isinstance(bases, str) and strategy is not None:
        raise HarpeArgumentError(f"give either {flag('bases')} or {flag('strategy')}, not both (got {flag('bases')} "
                                 f"{bases!r} and {flag('strategy')} {strategy})")
    if not search_defaults:
        refuse_unused_search_flags(args, prefix=prefix)
    if bases is None and strategy is None:
        return None
    search = {name: SEARCH_DEFAULTS[name] if _value(args, prefix, name) is None else _value(args, prefix, name)
              for name in SEARCH_DEFAULTS}
    descending = bool(_value(args, prefix, "descending"))
    try:
        if isinstance(bases, str):
            chosen = parse_bases(bases)
        elif bases is not None:  # already resolved (args read back from a checkpoint)
            chosen = list(bases)
        else:
            target = _value(args, prefix, "target_length") or target_length
            chosen = select_bases(num_query_groups, strategy, search["base_min"], search["base_max"],
                                  head_dim=head_dim, target_length=target, stride=search["stride"],
                                  descending=descending)
        chosen = validate_bases(chosen, len(chosen) if num_query_groups is None else num_query_groups)
    except ValueError as e:
        raise HarpeArgumentError(str(e)) from None
    if isinstance(bases, str) and descending:
        chosen = sorted(chosen, reverse=True)
    return chosen


def refuse_unused_search_flags(args: argparse.Namespace, *, prefix: str = "--harpe-") -> None:
    """Refuse a search flag the chosen source of bases does not read (flags declared with ``search_defaults=False``,
    where a value that is not None is one the user typed); a command calls it before any work."""
    flag = partial(_flag, prefix)
    bases, strategy = _value(args, prefix, "bases"), _value(args, prefix, "strategy")
    if strategy is None:
        given = [flag(name) for name in SEARCH_FLAGS if _value(args, prefix, name) is not None]
        if given and bases is not None:
            raise HarpeArgumentError(
                f"{', '.join(given)} set the base search of {flag('strategy')}, but {flag('bases')} {bases} is a list "
                f"of bases: drop {', '.join(given)}, or drop {flag('bases')} and pass {flag('strategy')}")
        if given:
            raise HarpeArgumentError(
                f"{', '.join(given)} set the base search of {flag('strategy')}: add {flag('strategy')} "
                f"(peak_valley, uniform or geometric), or drop them ({flag('bases')} "
                "gives the bases themselves)")
    elif strategy != "peak_valley" and _value(args, prefix, "stride") is not None:
        raise HarpeArgumentError(
            f"{flag('stride')} is peak_valley's candidate spacing; {flag('strategy')} {strategy} does not use it: "
            f"drop {flag('stride')} or use {flag('strategy')} peak_valley")


def add_harpe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: the HARPE group."""
    from megatron_harpe.rotary import ROPE_IMPLS  # megatron-core; select_bases' --help imports this module

    group = parser.add_argument_group(title="HARPE (head-adaptive RoPE bases)")
    add_harpe_base_arguments(group)
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


def check_parallel_layout(args: argparse.Namespace, gpus_per_node: int | None = None) -> None:
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


def resolve_harpe_args(args: argparse.Namespace) -> list[float] | None:
    """Validate the ``--harpe-*`` flags against the model and fix the bases; ``None`` means standard RoPE.

    On return ``args.harpe_bases`` is the list of floats the model is built with (or ``None``).
    Raises :class:`HarpeArgumentError` with what to change.
    """
    if not harpe_enabled(args):
        return None
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
    chosen = resolve_harpe_bases(args, groups, head_dim,
                                 args.seq_length or getattr(args, "encoder_seq_length", None))
    args.harpe_bases = chosen
    if getattr(args, "rank", 0) == 0:  # megatron's parse_args reads RANK; one line per job, not per rank
        strategy = args.harpe_strategy
        logger.info("HARPE bases (%d, one per query group, %s): %s", len(chosen),
                    strategy if strategy != "none" else "given", ", ".join(f"{b:.6g}" for b in chosen))
    return chosen


def harpe_bases_from_args(args: argparse.Namespace) -> list[float] | None:
    """The bases a checkpoint's saved ``args`` were trained with (``None``: standard RoPE)."""
    bases = getattr(args, "harpe_bases", None)
    if bases is None:
        return None
    if isinstance(bases, str):  # saved before resolution; should not happen for our own checkpoints
        return parse_bases(bases)
    return [float(b) for b in bases]
