"""A resumable evaluation grid: cells run in batches of equal-length prompts, results rewritten after every batch.

An interrupted run resumes where it stopped (cells already in the file are skipped); a results file written with
other settings, or a file that is not one of ours, is refused rather than mixed or replaced (``force`` starts afresh).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from megatron_harpe.command import RunError

if TYPE_CHECKING:  # compare_niah reads results without torch
    from megatron_harpe.eval.model import EvalModel

# make_sample(length, coordinate) -> (prompt ids without BOS, expected answer, extra fields for the record)
SampleFn = Callable[[int, float], tuple[list[int], str, dict]]


def cell_key(length: int, coordinate: float) -> str:
    return f"{length}@{coordinate:g}"


class ResultsError(RunError, ValueError):
    """A results file that cannot be read, resumed or replaced as asked; the message says what to do."""


_CELL_FIELDS = ("length", "coordinate", "score")


def read_results(path: str, tool: str = "eval_niah", hint: str = "") -> dict:
    """A results file written by ``tool`` (its settings and cells), or one error naming ``path`` and what is wrong."""
    def refuse(reason: str):
        raise ResultsError(f"{path}: not a results JSON written by {tool} ({reason})" + (f": {hint}" if hint else ""))

    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        refuse(str(e))
    except IsADirectoryError:
        refuse("a directory")
    if not isinstance(results, dict) or not isinstance(results.get("settings"), dict) \
            or not isinstance(results.get("cells"), dict):
        refuse("no 'settings' and 'cells' objects")
    for key, cell in results["cells"].items():
        if not isinstance(cell, dict) or any(name not in cell for name in _CELL_FIELDS):
            refuse(f"cell {key!r} lacks {', '.join(_CELL_FIELDS)}")
    return results


def start_results(results_path: str, settings: dict, tool: str, force: bool = False) -> dict:
    """The results to extend: the file's when it is an unfinished (or finished) run with these settings, else empty.

    A file that is not ours, or holds other settings, is refused unless ``force`` (then it is replaced, at the first
    write). Call it before loading a model, so a refusal costs nothing.
    """
    fresh = {"settings": settings, "cells": {}}
    if force or not os.path.exists(results_path):
        return fresh
    results = read_results(results_path, tool, hint="choose another --out, or pass --force to replace it")
    if results["settings"] != json.loads(json.dumps(settings)):
        raise ResultsError(f"{results_path} holds results for other settings: choose another --out, or pass --force "
                           "to replace them")
    return results


def run_grid(model: EvalModel, settings: dict, lengths: Sequence[int], coordinates: Sequence[float],
             make_sample: SampleFn, score: Callable[[str, str], float], results_path: str, *, batch_size: int,
             max_new_tokens: int, desc: str, progress: bool = True, tool: str = "eval_niah",
             force: bool = False) -> dict:
    from tqdm import tqdm

    results = start_results(results_path, settings, tool, force)
    todo = [(L, c) for L in lengths for c in coordinates if cell_key(L, c) not in results["cells"]]
    with tqdm(total=len(todo), desc=desc, unit="cell", disable=not progress) as bar:
        for length in lengths:
            cells = [(L, c) for L, c in todo if L == length]
            for start in range(0, len(cells), batch_size):
                batch = cells[start:start + batch_size]
                samples = [make_sample(L, c) for L, c in batch]
                outputs = model.generate([[model.bos_id] + ids for ids, _, _ in samples], max_new_tokens)
                for (L, c), (_, answer, extra), output in zip(batch, samples, outputs):
                    results["cells"][cell_key(L, c)] = {"length": L, "coordinate": c, "score": score(output, answer),
                                                        "answer": answer, "output": output, **extra}
                write_json(results, results_path)
                bar.update(len(batch))
    results["mean_score"] = float(np.mean([c["score"] for c in results["cells"].values()]))
    results["mean_by_length"] = {str(L): float(np.mean([c["score"] for c in results["cells"].values()
                                                          if c["length"] == L])) for L in lengths}
    write_json(results, results_path)
    return results


def score_grid(results: dict, lengths: Sequence[int], coordinates: Sequence[float]) -> np.ndarray:
    """``[coordinates, lengths]`` scores (NaN where a cell is missing)."""
    grid = np.full((len(coordinates), len(lengths)), np.nan)
    for cell in results["cells"].values():
        grid[list(coordinates).index(cell["coordinate"]), list(lengths).index(cell["length"])] = cell["score"]
    return grid


def write_json(results: dict, path: str) -> None:
    """Replace ``path`` in one rename: a reader (or a resumed run) sees the old file or the new one, never half."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
