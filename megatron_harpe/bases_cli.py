"""Choose (or read) HARPE bases, print one per head, optionally draw their waveforms."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Optional

from megatron_harpe.bases import STRATEGIES, parse_bases, select_bases, waveform_ripple

# Defaults of the options that only a strategy's search reads; None in the parser, so that a flag the user gave and
# the chosen source of bases does not read (--bases, or another strategy) is refused instead of silently ignored.
SEARCH_DEFAULTS = {"num_bases": 32, "base_min": 1e6, "base_max": 5e6, "stride": 30000.0}


def add_base_source_arguments(p: argparse.ArgumentParser, default: str = "--strategy peak_valley") -> None:
    """--bases | --strategy and the search's options, as select_bases and plot_harpe_bases take them.

    Read them back with :func:`bases_from_arguments`; ``default`` says (in the help) what neither flag means.
    """
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bases", help="explicit list ('1e6,2.5e6,...') or a preset such as paper-llama2-7b")
    src.add_argument("--strategy", choices=STRATEGIES, help=f"search for the bases (neither flag: {default})")
    p.add_argument("--num-bases", type=int, help="one per query group (default 32: Llama-2-7B; 8 for 70B); with "
                                                 "--bases it must equal the list's length")
    p.add_argument("--base-min", type=float, help="smallest base of a strategy's search (default 1e6)")
    p.add_argument("--base-max", type=float, help="largest base of a strategy's search (default 5e6)")
    p.add_argument("--stride", type=float, help="peak_valley candidate stride (default 30000)")
    p.add_argument("--descending", action="store_true", help="assign a strategy's largest base to the first head")


def bases_from_arguments(args: argparse.Namespace, default_bases: Optional[str] = None) -> list[float]:
    """The bases :func:`add_base_source_arguments`' flags ask for; ``ValueError`` (one line) for a contradiction.

    With neither --bases nor --strategy: ``default_bases`` (a list or preset) if given, else a peak_valley search.
    Needs ``args.head_dim`` and ``args.target_length``.
    """
    if args.bases is None and args.strategy is None and default_bases is not None:
        return _listed_bases(args, default_bases, given=False)
    if args.bases is not None:
        return _listed_bases(args, args.bases, given=True)
    strategy = args.strategy or "peak_valley"
    if args.stride is not None and strategy != "peak_valley":
        raise ValueError(f"--stride is peak_valley's candidate spacing; --strategy {strategy} does not use it: "
                         f"drop --stride or use --strategy peak_valley")
    search = {k: SEARCH_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in SEARCH_DEFAULTS}
    return select_bases(search["num_bases"], strategy, search["base_min"], search["base_max"],
                        head_dim=args.head_dim, target_length=args.target_length, stride=search["stride"],
                        descending=args.descending)


def _listed_bases(args: argparse.Namespace, text: str, given: bool) -> list[float]:
    """The list ``text`` (the user's --bases, or the tool's default list), refusing the search's options beside it."""
    source = f"--bases {text}" if given else f"the default list ({text}; no --strategy given)"
    search = "drop --bases and pass --strategy" if given else "pass --strategy"
    for flag, value in (("--base-min", args.base_min), ("--base-max", args.base_max), ("--stride", args.stride),
                        ("--descending", args.descending or None)):
        if value is not None:
            raise ValueError(f"{flag} configures a strategy's search, but {source} is a list of bases: "
                             f"drop {flag}, or {search}")
    bases = parse_bases(text)
    if args.num_bases is not None and args.num_bases != len(bases):
        other = f"give exactly {args.num_bases} bases" if given else search
        raise ValueError(f"{source} holds {len(bases)} bases but --num-bases is {args.num_bases}: "
                         f"drop --num-bases, or {other}")
    return bases


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_base_source_arguments(p)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--target-length", type=int, default=131072, help="tokens the waveform covers")
    p.add_argument("--plot", metavar="PNG", help="write the waveforms picture here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    return p


def _check_plot_path(path: str, force: bool) -> None:
    if not path.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG picture: give a path ending in .png (got {path})")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path} is a directory: give the picture's file name, e.g. {path}/bases.png")
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} exists: choose another path or pass --force")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--plot {path}: {ancestor} is a file, not a directory: choose another path")


def _write_plot(bases: list[float], path: str, head_dim: int, target_length: int) -> None:
    """Draw into a temporary directory beside ``path``; the picture is renamed into place only when complete."""
    from megatron_harpe.plots import plot_bases

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=directory)
    try:
        picture = plot_bases(bases, os.path.join(tmp, "bases.png"), head_dim=head_dim, target_length=target_length)
        os.replace(picture, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.force and not args.plot:
            raise ValueError("--force only lets --plot overwrite its file, and no --plot was given: drop --force")
        if args.plot:
            _check_plot_path(args.plot, args.force)
        bases = bases_from_arguments(args)
        ripple = waveform_ripple(bases, head_dim=args.head_dim, target_length=args.target_length)
        if args.plot:  # before printing anything: an error leaves neither a picture nor a table
            _write_plot(bases, args.plot, args.head_dim, args.target_length)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --plot {args.plot}: {e.strerror or e}: choose a writable path", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"bases": bases, "waveform_ripple": ripple}))
    else:
        for head, base in enumerate(bases):
            print(f"{head:3d}  {base:14.1f}")
        print(f"waveform ripple (lower = peaks and valleys interleave better): {ripple:.2f}")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
