"""The commands behind tools/eval_*.py."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import numpy as np


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> List[int]:
    return [int(float(x)) for x in text.split(",") if x]


PAPER_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]


def _common_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """The model, where results go, and the context lengths (the paper's 4k..128k by default)."""
    p.add_argument("--model", required=True, help="Hugging Face model directory (plain Llama or exported HARPE)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--lengths", type=_ints, default=list(PAPER_LENGTHS), help="context lengths in tokens")


def _print_grid(grid, lengths, rows, row_label) -> None:
    print(f"{row_label:>13} " + " ".join(f"{n:>7}" for n in lengths))
    for row_value, row in zip(rows, grid):
        print(f"{row_value:>13} " + " ".join(f"{v:7.2f}" for v in row))


def eval_niah(argv: Optional[List[str]] = None) -> int:
    from megatron_harpe.eval.grid import score_grid
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import NiahSettings, run_niah
    from megatron_harpe.plots import plot_niah_heatmap

    p = argparse.ArgumentParser(description="Needle-in-a-Haystack grid (length x depth) on a Hugging Face model.")
    _common_args(p, "results directory (niah.json, niah.png); an unfinished run resumes")
    p.add_argument("--depths", type=_floats, default=[round(i / 10, 1) for i in range(11)])
    p.add_argument("--suite", choices=["classic", "ruler"], default="classic",
                   help="classic: a length x depth heatmap of one needle; ruler: RULER's 8 NIAH tasks averaged per "
                        "length (the paper's Table 4)")
    p.add_argument("--needle-style", choices=["classic", "ruler", "lwm"], default="classic",
                   help="classic suite: San Francisco sandwich, RULER's single magic-number needle, or LWM's "
                        "magic city number")
    p.add_argument("--tasks", default=",".join(["single_1", "single_2", "single_3", "multikey_1", "multikey_2",
                                                "multikey_3", "multivalue", "multiquery"]),
                   help="ruler suite: tasks to run")
    p.add_argument("--samples", type=int, default=20, help="ruler suite: samples per task and length")
    p.add_argument("--needle", help="your own needle sentence (with --question and --answer)")
    p.add_argument("--question")
    p.add_argument("--answer")
    p.add_argument("--haystack-file", help="text to fill the context with (paragraphs cycled); default: synthetic")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    custom = (args.needle, args.question, args.answer)
    if any(custom) and not all(custom):
        p.error("--needle, --question and --answer go together")
    if not args.lengths or not args.depths or any(not 0 <= d <= 1 for d in args.depths):
        p.error("--lengths and --depths need values; depths are fractions in [0, 1]")
    if args.suite == "ruler":
        return _eval_ruler(args)
    try:
        model = load_eval_model(args.model, args.device, args.dtype)
        settings = NiahSettings(lengths=args.lengths, depths=args.depths, style=args.needle_style,
                                needle=list(custom) if all(custom) else None, haystack_file=args.haystack_file,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        results = run_niah(model, settings, os.path.join(args.out, "niah.json"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    grid = score_grid(results, args.lengths, args.depths)
    png = plot_niah_heatmap(grid, args.lengths, args.depths, os.path.join(args.out, "niah.png"),
                            title=f"NIAH ({args.needle_style}) {os.path.basename(os.path.normpath(args.model))}")
    _print_grid(grid, args.lengths, [f"{100 * d:.0f}%" for d in args.depths], "depth/length")
    print(f"mean score {results['mean_score']:.3f}; wrote {os.path.join(args.out, 'niah.json')} and {png}")
    return 0


def _eval_ruler(args) -> int:
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import haystack_from_file
    from megatron_harpe.eval.ruler import PAPER_TABLE_4, TASKS, run_ruler, table

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.samples < 1:
        print(f"error: unknown task(s) {unknown} (choose from {', '.join(TASKS)}) or --samples < 1", file=sys.stderr)
        return 2
    try:
        model = load_eval_model(args.model, args.device, args.dtype)
        haystack = haystack_from_file(args.haystack_file) if args.haystack_file else None
        results = run_ruler(model, tasks, args.lengths, args.samples, args.out,
                            max_new_tokens=max(args.max_new_tokens, 64), batch_size=args.batch_size,
                            haystack_text=haystack)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows, grid = table(results, args.lengths)
    _print_grid(grid, args.lengths, rows, "task/length")
    print(f"RULER NIAH average over lengths: {grid[-1].mean():.2f} (paper's Table 4, Llama-2-7B at 4k-128k: "
          + ", ".join(f"{k} {v}" for k, v in PAPER_TABLE_4.items()) + f"); results in {args.out}/ruler_*.json")
    return 0


def eval_passkey(argv: Optional[List[str]] = None) -> int:
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import PasskeySettings, run_passkey

    p = argparse.ArgumentParser(description="Passkey retrieval accuracy by context length on a Hugging Face model.")
    _common_args(p, "results directory (passkey.json); an unfinished run resumes")
    p.add_argument("--trials", type=int, default=5, help="pass keys per length, at evenly spaced depths")
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    if args.trials < 1 or not args.lengths:
        p.error("--trials >= 1 and at least one length")
    try:
        model = load_eval_model(args.model, args.device, args.dtype)
        results = run_passkey(model, PasskeySettings(lengths=args.lengths, trials=args.trials,
                                                     batch_size=args.batch_size),
                              os.path.join(args.out, "passkey.json"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for length, accuracy in results["mean_by_length"].items():
        print(f"{int(length):>8} tokens: passkey accuracy {accuracy:.2f}")
    print(f"mean {results['mean_score']:.3f}; wrote {os.path.join(args.out, 'passkey.json')}")
    return 0


def eval_perplexity(argv: Optional[List[str]] = None) -> int:
    import json

    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.perplexity import sliding_window_perplexity

    p = argparse.ArgumentParser(description="Sliding-window perplexity (stride 256) at growing context lengths.")
    _common_args(p, "results directory (perplexity.json)")
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--text-file", help="text to score (default: synthetic filler, 2x the longest length)")
    args = p.parse_args(argv)
    try:
        model = load_eval_model(args.model, args.device, args.dtype)
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as f:
                ids = model.encode(f.read())
        else:
            ids, filler = [], FillerText(seed=0)
            while len(ids) < 2 * max(args.lengths):
                ids += model.encode(filler.paragraph())
        ids = [model.bos_id] + ids
        table = {str(L): sliding_window_perplexity(model, ids, L, args.stride) for L in args.lengths}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "perplexity.json"), "w") as f:
        json.dump({"stride": args.stride, "tokens": len(ids), "perplexity": table}, f, indent=1)
    for length, value in table.items():
        print(f"{int(length):>8} tokens of context: perplexity {value:.3f}")
    print(f"wrote {os.path.join(args.out, 'perplexity.json')} ({len(ids)} tokens scored, stride {args.stride})")
    return 0


def compare_niah(argv: Optional[List[str]] = None) -> int:
    import json

    from megatron_harpe.eval.grid import score_grid
    from megatron_harpe.plots import plot_niah_comparison

    p = argparse.ArgumentParser(description="Two NIAH results (say HARPE and ABF) side by side, and their difference.")
    p.add_argument("results", nargs=2, help="two niah.json files from tools/eval_niah.py")
    p.add_argument("--labels", nargs=2, default=["A", "B"])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.force:
            raise ValueError(f"{args.out} exists: choose another --out or pass --force")
        loaded = []
        for path in args.results:
            with open(path) as f:
                loaded.append(json.load(f))
        axes = [(r["settings"]["lengths"], r["settings"]["depths"]) for r in loaded]
        if axes[0] != axes[1]:
            raise ValueError("the two results cover different lengths or depths: evaluate both on the same grid")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lengths, depths = axes[0]
    grids = [score_grid(r, lengths, depths) for r in loaded]
    plot_niah_comparison(grids, args.labels, lengths, depths, args.out)
    for label, grid in zip(args.labels, grids):
        print(f"{label}: mean {float(np.nanmean(grid)):.3f}")
    print(f"wrote {args.out}")
    return 0


def plot_harpe_bases(argv: Optional[List[str]] = None) -> int:
    from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, STRATEGIES, parse_bases, select_bases
    from megatron_harpe.plots import plot_bases

    p = argparse.ArgumentParser(description="HARPE bases and their attention waveforms, per head and averaged, "
                                            "against single-base ABF.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bases", help="a list ('1e6,2.5e6,...') or a preset (paper-llama2-7b); default: the paper's")
    src.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--num-bases", type=int, default=32)
    p.add_argument("--base-min", type=float, default=1e6)
    p.add_argument("--base-max", type=float, default=5e6)
    p.add_argument("--stride", type=float, default=30000)
    p.add_argument("--abf-base", type=float, default=5e6, help="the single-base ABF baseline drawn for comparison")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--target-length", type=int, default=131072)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.force:
            raise ValueError(f"{args.out} exists: choose another --out or pass --force")
        if args.strategy:
            bases = select_bases(args.num_bases, args.strategy, args.base_min, args.base_max, head_dim=args.head_dim,
                                 target_length=args.target_length, stride=args.stride)
        else:
            bases = parse_bases(args.bases or "paper-llama2-7b")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = args.out + ".partial.png"
    plot_bases(bases, tmp, head_dim=args.head_dim, target_length=args.target_length, single_base=args.abf_base,
               compare=PAPER_LLAMA2_7B_BASES if len(bases) == len(PAPER_LLAMA2_7B_BASES) else None)
    os.replace(tmp, args.out)
    print(f"{len(bases)} bases from {min(bases):.4g} to {max(bases):.4g}; wrote {args.out}")
    return 0
