"""The evaluation commands: ``harpe-eval-niah``, ``harpe-eval-passkey``, ``harpe-eval-perplexity`` and
``harpe-compare-niah`` (tools/eval_*.py, tools/compare_niah.py).

Only argparse at import, so ``--help`` loads neither torch nor megatron. Outputs already in
``--out`` are refused before the model loads (minutes), unless ``--force``; an unfinished grid with the same settings
resumes instead. Files appear complete or not at all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from megatron_harpe.command import UsageError, run_command
from megatron_harpe.warning_filters import filter_unactionable_warnings


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
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
    p.add_argument("--force", action="store_true",
                   help="replace result files already in --out (without it they are refused; an unfinished run with "
                        "the same settings resumes)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python files of a model folder whose config.json has an auto_map (not needed for a "
                        "plain Llama or for tools/convert_megatron_to_hf.py's HARPE export, recognised by its files)")


def _run(body: Callable[[], None]) -> int:
    """``body``'s status; besides the CommandErrors (ResultsError, ModelLoadError, OutputError) a failed run raises
    OSError (a missing or unreadable file) or ValueError (transformers refusing a model folder): one line, exit 1."""
    filter_unactionable_warnings()  # before the body's imports of torch and transformers
    return run_command(body, failures=(OSError, ValueError))


def _check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file: give a directory for the results")


def _refuse_existing(paths: Sequence[str], force: bool) -> None:
    from megatron_harpe.outputs import OutputExistsError

    for path in paths:
        if os.path.exists(path) and not force:
            raise OutputExistsError(f"{path} exists: choose another --out or pass --force to replace it")


def _print_grid(grid, lengths, rows, row_label) -> None:
    print(f"{row_label:>13} " + " ".join(f"{n:>7}" for n in lengths))
    for row_value, row in zip(rows, grid):
        print(f"{row_value:>13} " + " ".join(f"{v:7.2f}" for v in row))


def eval_niah(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Needle-in-a-Haystack grid (length x depth) on a Hugging Face model.",
                                allow_abbrev=False)
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
    return _run(lambda: _eval_ruler(args) if args.suite == "ruler" else _eval_classic(args, custom))


def _eval_classic(args, custom: tuple[str | None, str | None, str | None]) -> None:
    from dataclasses import asdict

    from megatron_harpe.eval.grid import score_grid, start_results
    from megatron_harpe.eval.niah import NiahSettings

    settings = NiahSettings(lengths=args.lengths, depths=args.depths, style=args.needle_style,
                            needle=list(custom) if all(custom) else None, haystack_file=args.haystack_file,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results_path, png = os.path.join(args.out, "niah.json"), os.path.join(args.out, "niah.png")
    _check_out_dir(args.out)
    previous = start_results(results_path, asdict(settings), "eval_niah", args.force)
    replace_picture = args.force or _is_own_picture(png, previous)
    _refuse_existing([png], replace_picture)
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import run_niah

    model = load_eval_model(args.model, args.device, args.dtype, args.trust_remote_code)
    results = run_niah(model, settings, results_path, force=args.force)
    grid = score_grid(results, args.lengths, args.depths)
    _write_heatmap(results, results_path, grid, args, png, replace_picture)
    _print_grid(grid, args.lengths, [f"{100 * d:.0f}%" for d in args.depths], "depth/length")
    print(f"mean score {results['mean_score']:.3f}; wrote {results_path} and {png}")


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _is_own_picture(png: str, results: dict) -> bool:
    """Whether ``png`` is the heatmap this run's results file recorded (a rerun may redraw it without --force)."""
    return os.path.isfile(png) and results.get("picture_sha256") == _sha256(png)


def _write_heatmap(results: dict, results_path: str, grid, args, png: str, replace: bool) -> None:
    """The heatmap, its digest recorded in the results (so a rerun knows the picture is its own), then the rename."""
    from megatron_harpe.eval.grid import write_json
    from megatron_harpe.outputs import atomic_output_files
    from megatron_harpe.plots import plot_niah_heatmap

    with atomic_output_files([png], force=replace, flag="--out") as staged:
        plot_niah_heatmap(grid, args.lengths, args.depths, staged[png],
                          title=f"NIAH ({args.needle_style}) {os.path.basename(os.path.normpath(args.model))}")
        results["picture_sha256"] = _sha256(staged[png])
        write_json(results, results_path)


def _eval_ruler(args) -> None:
    from megatron_harpe.eval.grid import start_results
    from megatron_harpe.eval.ruler import PAPER_TABLE_4, TASKS, results_file, ruler_settings, run_ruler, table

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.samples < 1:
        raise UsageError(f"unknown task(s) {unknown} (choose from {', '.join(TASKS)}) or --samples < 1")
    max_new_tokens = max(args.max_new_tokens, 64)
    _check_out_dir(args.out)
    for task in tasks:
        start_results(results_file(args.out, task),
                      ruler_settings(task, args.lengths, args.samples, max_new_tokens, 0, bool(args.haystack_file)),
                      "eval_niah --suite ruler", args.force)
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import haystack_from_file

    haystack = haystack_from_file(args.haystack_file) if args.haystack_file else None
    model = load_eval_model(args.model, args.device, args.dtype, args.trust_remote_code)
    results = run_ruler(model, tasks, args.lengths, args.samples, args.out, max_new_tokens=max_new_tokens,
                        batch_size=args.batch_size, haystack_text=haystack, force=args.force)
    rows, grid = table(results, args.lengths)
    _print_grid(grid, args.lengths, rows, "task/length")
    print(f"RULER NIAH average over lengths: {grid[-1].mean():.2f} (paper's Table 4, Llama-2-7B at 4k-128k: "
          + ", ".join(f"{k} {v}" for k, v in PAPER_TABLE_4.items()) + f"); results in {args.out}/ruler_*.json")


def eval_passkey(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Passkey retrieval accuracy by context length on a Hugging Face model.",
                                allow_abbrev=False)
    _common_args(p, "results directory (passkey.json); an unfinished run resumes")
    p.add_argument("--trials", type=int, default=5, help="pass keys per length, at evenly spaced depths")
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    if args.trials < 1 or not args.lengths:
        p.error("--trials >= 1 and at least one length")
    return _run(lambda: _eval_passkey(args))


def _eval_passkey(args) -> None:
    from dataclasses import asdict

    from megatron_harpe.eval.grid import start_results
    from megatron_harpe.eval.niah import PasskeySettings

    settings = PasskeySettings(lengths=args.lengths, trials=args.trials, batch_size=args.batch_size)
    results_path = os.path.join(args.out, "passkey.json")
    _check_out_dir(args.out)
    start_results(results_path, asdict(settings), "eval_passkey", args.force)
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.niah import run_passkey

    model = load_eval_model(args.model, args.device, args.dtype, args.trust_remote_code)
    results = run_passkey(model, settings, results_path, force=args.force)
    for length, accuracy in results["mean_by_length"].items():
        print(f"{int(length):>8} tokens: passkey accuracy {accuracy:.2f}")
    print(f"mean {results['mean_score']:.3f}; wrote {results_path}")


def eval_perplexity(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sliding-window perplexity (stride 256) at growing context lengths.",
                                allow_abbrev=False)
    _common_args(p, "results directory (perplexity.json)")
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--text-file", help="text to score (default: synthetic filler, 2x the longest length)")
    args = p.parse_args(argv)
    if not args.lengths or args.stride < 1:
        p.error("at least one length, and --stride >= 1")
    return _run(lambda: _eval_perplexity(args))


def _eval_perplexity(args) -> None:
    import json

    results_path = os.path.join(args.out, "perplexity.json")
    _check_out_dir(args.out)
    _refuse_existing([results_path], args.force)
    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.perplexity import sliding_window_perplexity
    from megatron_harpe.outputs import atomic_output_files

    model = load_eval_model(args.model, args.device, args.dtype, args.trust_remote_code)
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            ids = model.encode(f.read())
    else:
        ids, filler = [], FillerText(seed=0)
        while len(ids) < 2 * max(args.lengths):
            ids += model.encode(filler.paragraph())
    ids = [model.bos_id] + ids
    table = {str(L): sliding_window_perplexity(model, ids, L, args.stride) for L in args.lengths}
    with atomic_output_files([results_path], force=args.force, flag="--out") as staged:
        with open(staged[results_path], "w") as f:
            json.dump({"stride": args.stride, "tokens": len(ids), "perplexity": table}, f, indent=1)
    for length, value in table.items():
        print(f"{int(length):>8} tokens of context: perplexity {value:.3f}")
    print(f"wrote {results_path} ({len(ids)} tokens scored, stride {args.stride})")


def compare_niah(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Two NIAH results (say HARPE and ABF) side by side, and their difference.",
                                allow_abbrev=False)
    p.add_argument("results", nargs=2, help="two niah.json files from tools/eval_niah.py")
    p.add_argument("--labels", nargs=2, default=["A", "B"])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    return _run(lambda: _compare_niah(args))


def _compare_niah(args) -> None:
    import numpy as np

    from megatron_harpe.eval.grid import ResultsError, score_grid
    from megatron_harpe.outputs import atomic_output_files
    from megatron_harpe.plots import plot_niah_comparison

    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a directory: give the PNG file to write")
    _refuse_existing([args.out], args.force)
    loaded = [_read_niah_results(path) for path in args.results]
    axes = [(r["settings"]["lengths"], r["settings"]["depths"]) for r in loaded]
    if axes[0] != axes[1]:
        raise ResultsError("the two results cover different lengths or depths: evaluate both on the same grid")
    lengths, depths = axes[0]
    grids = [score_grid(r, lengths, depths) for r in loaded]
    with atomic_output_files([args.out], force=args.force, flag="--out") as staged:
        plot_niah_comparison(grids, args.labels, lengths, depths, staged[args.out])
    for label, grid in zip(args.labels, grids):
        print(f"{label}: mean {float(np.nanmean(grid)):.3f}")
    print(f"wrote {args.out}")


def _read_niah_results(path: str) -> dict:
    """A classic-suite niah.json: its settings name the grid and every cell lies on it."""
    from megatron_harpe.eval.grid import ResultsError, read_results

    hint = "give a niah.json written by tools/eval_niah.py"
    results = read_results(path, "eval_niah", hint)
    settings = results["settings"]
    lengths, depths = settings.get("lengths"), settings.get("depths")
    if not isinstance(lengths, list) or not isinstance(depths, list):
        raise ResultsError(f"{path}: not a results JSON written by eval_niah (its settings have no lengths and "
                           f"depths: a passkey or RULER file?): {hint}")
    off_grid = [key for key, cell in results["cells"].items()
                if cell["length"] not in lengths or cell["coordinate"] not in depths]
    if off_grid:
        raise ResultsError(f"{path}: not a results JSON written by eval_niah (cell {off_grid[0]!r} is off its "
                           f"lengths x depths grid): {hint}")
    return results
