"""Needle-in-a-Haystack grids (context length x needle depth): resumable JSON results and the heatmap PNG.

Each cell builds a context of exactly ``length`` tokens (BOS included) with the needle inserted at the sentence
boundary at or before ``depth`` (``megatron_harpe.data.synthetic``), asks the question, decodes greedily and scores
with ``scoring.string_match_all``. Results are rewritten after every batch, so an interrupted run resumes where it
stopped (cells already in the file are skipped); a results file written with other settings is refused.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from megatron_harpe.data.synthetic import needle_sample
from megatron_harpe.eval.model import EvalModel
from megatron_harpe.eval.scoring import string_match_all


@dataclass
class NiahSettings:
    lengths: List[int]
    depths: List[float]
    style: str = "classic"                  # classic (San Francisco) | ruler (magic number, single needle)
    needle: Optional[List[str]] = None     # [needle, question, answer] instead of the style's
    haystack_file: Optional[str] = None     # default: the built-in synthetic filler
    max_new_tokens: int = 32
    batch_size: int = 1
    seed: int = 0


def _haystack_from_file(path: str) -> Callable[[], str]:
    with open(path, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"{path} holds no text to build a haystack from")
    cycle = itertools.cycle(paragraphs)
    return lambda: next(cycle)


def cell_key(length: int, depth: float) -> str:
    return f"{length}@{depth:g}"


def run_niah(model: EvalModel, settings: NiahSettings, results_path: str, progress: bool = True) -> dict:
    """Fill (or finish) ``results_path`` with every cell of the grid; returns the results."""
    from tqdm import tqdm

    wanted = asdict(settings)
    results = {"settings": wanted, "cells": {}}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if results.get("settings") != json.loads(json.dumps(wanted)):
            raise ValueError(f"{results_path} holds results for other settings: choose another --out or delete it")
    todo = [(L, d) for L in settings.lengths for d in settings.depths if cell_key(L, d) not in results["cells"]]
    haystack = _haystack_from_file(settings.haystack_file) if settings.haystack_file else None
    needle = tuple(settings.needle) if settings.needle else None
    with tqdm(total=len(todo), desc="needle-in-a-haystack", unit="cell", disable=not progress) as bar:
        for length in settings.lengths:
            cells = [(L, d) for L, d in todo if L == length]
            for start in range(0, len(cells), settings.batch_size):
                batch = cells[start:start + settings.batch_size]
                samples = [needle_sample(model.encode, model.decode, context_tokens=length - 1, depth=d,
                                         seed=settings.seed, style=settings.style, needle=needle,
                                         haystack=haystack) for _, d in batch]
                outputs = model.generate([[model.bos_id] + s.input_ids for s in samples], settings.max_new_tokens)
                for (L, d), sample, output in zip(batch, samples, outputs):
                    results["cells"][cell_key(L, d)] = {
                        "length": L, "depth": d, "score": string_match_all(output, sample.answer),
                        "answer": sample.answer, "output": output, "needle_position": sample.needle_position + 1}
                _write_json(results, results_path)
                bar.update(len(batch))
    results["mean_score"] = float(np.mean([c["score"] for c in results["cells"].values()]))
    _write_json(results, results_path)
    return results


def score_grid(results: dict) -> Tuple[np.ndarray, List[int], List[float]]:
    """``[depths, lengths]`` scores (NaN where a cell is missing)."""
    lengths, depths = results["settings"]["lengths"], results["settings"]["depths"]
    grid = np.full((len(depths), len(lengths)), np.nan)
    for cell in results["cells"].values():
        grid[depths.index(cell["depth"]), lengths.index(cell["length"])] = cell["score"]
    return grid, lengths, depths


def _write_json(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
