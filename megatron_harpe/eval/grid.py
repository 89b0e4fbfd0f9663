"""A resumable evaluation grid: cells run in batches of equal-length prompts, results rewritten after every batch.

An interrupted run resumes where it stopped (cells already in the file are skipped); a results file written with
other settings is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from megatron_harpe.eval.model import EvalModel

# make_sample(length, coordinate) -> (prompt ids without BOS, expected answer, extra fields for the record)
SampleFn = Callable[[int, float], Tuple[List[int], str, dict]]


def cell_key(length: int, coordinate: float) -> str:
    return f"{length}@{coordinate:g}"


def run_grid(model: EvalModel, settings: dict, lengths: Sequence[int], coordinates: Sequence[float],
             make_sample: SampleFn, score: Callable[[str, str], float], results_path: str, *, batch_size: int,
             max_new_tokens: int, desc: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    results = {"settings": settings, "cells": {}}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if results.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(f"{results_path} holds results for other settings: choose another --out or delete it")
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


def write_json(results: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
