"""The commands behind tools/eval_*.py."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> List[int]:
    return [int(float(x)) for x in text.split(",") if x]


def eval_niah(argv: Optional[List[str]] = None) -> int:
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import NiahSettings, run_niah, score_grid
    from megatron_harpe.plots import plot_niah_heatmap

    p = argparse.ArgumentParser(description="Needle-in-a-Haystack grid (length x depth) on a Hugging Face model.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (plain Llama or exported HARPE)")
    p.add_argument("--out", required=True, help="results directory (niah.json, niah.png); an unfinished run resumes")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--depths", type=_floats, default=[round(i / 10, 1) for i in range(11)])
    p.add_argument("--needle-style", choices=["classic", "ruler"], default="classic",
                   help="classic: San Francisco sandwich; ruler: RULER's single magic-number needle")
    p.add_argument("--needle", help="your own needle sentence (with --question and --answer)")
    p.add_argument("--question")
    p.add_argument("--answer")
    p.add_argument("--haystack-file", help="text to fill the context with (paragraphs cycled); default: synthetic")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    custom = (args.needle, args.question, args.answer)
    if any(custom) and not all(custom):
        p.error("--needle, --question and --answer go together")
    if not args.lengths or not args.depths or any(not 0 <= d <= 1 for d in args.depths):
        p.error("--lengths and --depths need values; depths are fractions in [0, 1]")
    try:
        model = load_eval_model(args.model, args.device, args.dtype)
        settings = NiahSettings(lengths=args.lengths, depths=args.depths, style=args.needle_style,
                                needle=list(custom) if all(custom) else None, haystack_file=args.haystack_file,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        results = run_niah(model, settings, os.path.join(args.out, "niah.json"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    grid, lengths, depths = score_grid(results)
    png = plot_niah_heatmap(grid, lengths, depths, os.path.join(args.out, "niah.png"),
                            title=f"NIAH ({args.needle_style}) {os.path.basename(os.path.normpath(args.model))}")
    print("depth \\ length " + " ".join(f"{n:>7}" for n in lengths))
    for depth, row in zip(depths, grid):
        print(f"{100 * depth:13.0f}% " + " ".join(f"{v:7.2f}" for v in row))
    print(f"mean score {results['mean_score']:.3f}; wrote {os.path.join(args.out, 'niah.json')} and {png}")
    return 0
