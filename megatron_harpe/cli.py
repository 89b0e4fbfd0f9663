"""The top-level commands: ``harpe-select-bases`` (tools/select_bases.py) and ``harpe-demo`` (tools/harpe_demo.py).

Only argparse and numpy at import: ``--help`` loads neither torch nor megatron.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_harpe.arguments import add_harpe_base_arguments, resolve_harpe_bases
from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, waveform_ripple
from megatron_harpe.command import RunError, UsageError, run_command

SELECT_PREFIX = "--"  # select_bases' flags: --bases, --strategy, --base-min, ... (the trainer's without "harpe-")
DEFAULT_NUM_BASES = 32  # Llama-2-7B's heads
DEFAULT_ABF_BASE = 5e6  # the paper's single-base ABF baseline


def select_bases_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose (or read) HARPE bases, print one per head, optionally draw "
                                            "their waveforms against single-base ABF.", allow_abbrev=False)
    add_harpe_base_arguments(p, prefix=SELECT_PREFIX, search_defaults=False, target_length=False,
                             neither="--strategy peak_valley")
    p.add_argument("--num-bases", type=int, help=f"one per query group (default {DEFAULT_NUM_BASES}: Llama-2-7B; 8 "
                                                 "for 70B); with --bases it must equal the list's length")
    p.add_argument("--head-dim", type=int, default=128)
    # Its own dest: the waveform's length serves the ripple and the picture too, not only a strategy's search.
    p.add_argument("--target-length", dest="waveform_length", metavar="TARGET_LENGTH", type=int, default=131072,
                   help="tokens the waveform covers")
    p.add_argument("--plot", metavar="PNG", help="write the waveforms picture here")
    p.add_argument("--abf-base", type=float,
                   help=f"the single-base ABF baseline the --plot picture draws for comparison (default "
                        f"{DEFAULT_ABF_BASE:.0e})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    return p


def chosen_bases(args: argparse.Namespace) -> list[float]:
    """What select_bases' flags ask for: a list, or a search (peak_valley when neither flag is given)."""
    if args.bases is None and args.strategy is None:
        args.strategy = "peak_valley"
    listed = args.bases is not None
    count = args.num_bases if args.num_bases is not None else DEFAULT_NUM_BASES
    bases = resolve_harpe_bases(args, None if listed else count, args.head_dim, args.waveform_length,
                                prefix=SELECT_PREFIX, search_defaults=False)
    if listed and args.num_bases is not None and args.num_bases != len(bases):
        raise UsageError(f"--bases {args.bases} holds {len(bases)} bases but --num-bases is {args.num_bases}: "
                         f"drop --num-bases, or give exactly {args.num_bases} bases")
    return bases


def _check_plot_path(path: str, force: bool) -> None:
    if not path.lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG picture: give a path ending in .png (got {path})")
    if os.path.isdir(path):
        raise RunError(f"--plot {path} is a directory: give the picture's file name, e.g. {path}/bases.png")
    if os.path.exists(path) and not force:
        raise RunError(f"{path} exists: choose another path or pass --force")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise RunError(f"--plot {path}: {ancestor} is a file, not a directory: choose another path")


def _write_plot(bases: list[float], args: argparse.Namespace) -> None:
    from megatron_harpe.outputs import OutputError, atomic_output_files
    from megatron_harpe.plots import plot_bases

    try:
        with atomic_output_files([args.plot], force=args.force, flag="--plot") as staged:
            plot_bases(bases, staged[args.plot], head_dim=args.head_dim, target_length=args.waveform_length,
                       single_base=DEFAULT_ABF_BASE if args.abf_base is None else args.abf_base,
                       compare=PAPER_LLAMA2_7B_BASES if len(bases) == len(PAPER_LLAMA2_7B_BASES) else None)
    except OutputError:  # a full disk: already one line naming the output
        raise
    except OSError as e:
        raise RunError(f"cannot write --plot {args.plot}: {e.strerror or e}: choose a writable path") from None


def select_bases(argv: list[str] | None = None) -> int:
    args = select_bases_parser().parse_args(argv)

    def body() -> None:
        for flag, given, what in (("--force", args.force, "lets --plot overwrite its file"),
                                  ("--abf-base", args.abf_base is not None, "draws in the --plot picture")):
            if given and not args.plot:
                raise UsageError(f"{flag} only {what}, and no --plot was given: drop {flag}")
        if args.plot:
            _check_plot_path(args.plot, args.force)
        bases = chosen_bases(args)
        ripple = waveform_ripple(bases, head_dim=args.head_dim, target_length=args.waveform_length)
        if args.plot:  # before printing anything: an error leaves neither a picture nor a table
            _write_plot(bases, args)
        if args.json:
            print(json.dumps({"bases": bases, "waveform_ripple": ripple}))
        else:
            for head, base in enumerate(bases):
                print(f"{head:3d}  {base:14.1f}")
            print(f"waveform ripple (lower = peaks and valleys interleave better): {ripple:.2f}")
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)

    return run_command(body, usage=(ValueError,))  # ValueError: a --head-dim or --target-length the waveform refuses


def demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The HARPE demonstration: choose HARPE bases, draw them, run a tiny "
                                                 "HARPE model at TP=2 against TP=1.", allow_abbrev=False)
    parser.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty output directory")
    args = parser.parse_args(argv)

    def body() -> None:
        from megatron_harpe.demo import run_demo

        run_demo(args.out, args.force)
        out = os.path.abspath(args.out)
        print(f"results in {out}:")
        for name in sorted(os.listdir(out)):
            print(f"  {os.path.join(out, name)}")

    return run_command(body)
