"""The comparison's results: one JSON, a markdown table per metric (like the paper's Table 4) and pictures.

Scores are means over seeds with their sample standard deviation (n - 1; 0 for one seed). Stage 0 (the model every
method starts from) is a row of its own. "avg <= L1" averages the lengths up to the trained one, as Table 4
averages 4k-128k; the columns past L1 show extrapolation.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_harpe.command import RunError
from megatron_harpe.compare.evaluate import SUMMARY
from megatron_harpe.compare.methods import LABELS
from megatron_harpe.compare.presets import ComparePreset

# (summary key, title, scale to percent, higher is better)
METRICS = (("ruler_average", "RULER NIAH, average of the tasks (%)", 100.0, True),
           ("passkey", "Passkey retrieval (%)", 100.0, True),
           ("niah", "NIAH, magic-number needle, mean over depths (%)", 100.0, True),
           ("perplexity", "Sliding-window perplexity on filler text", 1.0, False))


def _summaries(root: str, preset: ComparePreset, methods: list[str]) -> dict[str, list[dict]]:
    from megatron_harpe.compare.runner import Paths

    paths = Paths(root)
    runs = {"stage0": [os.path.join(paths.stage0, "eval", SUMMARY)]}
    for method in methods:
        runs[method] = [os.path.join(paths.run(method, i), "eval", SUMMARY) for i in range(1, preset.seeds + 1)]
    summaries = {}
    for name, files in runs.items():
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise RunError(f"no results for {name}: {missing[0]} is missing (run the comparison to the end)")
        summaries[name] = []
        for f in files:
            with open(f) as handle:
                summaries[name].append(json.load(handle))
    return summaries


def _spread(values: list[list[float]]) -> tuple[list[float], list[float]]:
    array = np.asarray(values, dtype=float)  # [seeds, lengths]
    std = array.std(axis=0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1])
    return array.mean(axis=0).tolist(), std.tolist()


def aggregate(summaries: dict[str, list[dict]], lengths: list[int]) -> dict:
    table = {}
    for name, runs in summaries.items():
        entry = {"label": "stage 0 (base 10k, L0)" if name == "stage0" else LABELS[name], "seeds": len(runs),
                 "metrics": {}, "ruler_tasks": {}}
        for key, *_ in METRICS:
            mean, std = _spread([[run[key][str(L)] for L in lengths] for run in runs])
            entry["metrics"][key] = {"mean": mean, "std": std}
        for task in runs[0]["ruler"]:
            mean, std = _spread([[run["ruler"][task][str(L)] for L in lengths] for run in runs])
            entry["ruler_tasks"][task] = {"mean": mean, "std": std}
        entry["niah_grid_mean"] = np.mean([run["niah_grid"] for run in runs], axis=0).tolist()
        table[name] = entry
    return table


def markdown(table: dict, preset: ComparePreset) -> str:
    lengths = preset.eval_lengths
    trained = [i for i, L in enumerate(lengths) if L <= preset.l1]
    shape, s0, s1 = preset.shape, preset.stage0, preset.stage1
    stage1_tokens = s1.iters * s1.global_batch_size * preset.l1
    lines = [f"# HARPE against its baselines: preset `{preset.name}`", "",
             f"Stage 0: {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads in "
             f"{shape.num_query_groups} query groups, trained at L0 = {preset.l0} with base 10k ({s0.iters} "
             f"iterations x {s0.global_batch_size} sequences). Stage 1: L1 = {preset.l1}, {s1.iters} iterations x "
             f"{s1.global_batch_size} sequences per method ({stage1_tokens:,} tokens), mean +- std over "
             f"{preset.seeds} seed(s). ABF base {preset.abf_base:g}; HARPE bases in [{preset.harpe_range[0]:g}, "
             f"{preset.harpe_range[1]:g}].", ""]
    for key, title, scale, _ in METRICS:
        lines += [f"## {title}", "", "| method | " + " | ".join(str(L) for L in lengths) + " | avg <= L1 |",
                  "|---|" + "---:|" * (len(lengths) + 1)]
        for entry in table.values():
            mean, std = (np.asarray(entry["metrics"][key][k]) * scale for k in ("mean", "std"))
            cells = [f"{m:.1f} +- {s:.1f}" if entry["seeds"] > 1 else f"{m:.1f}" for m, s in zip(mean, std)]
            lines.append(f"| {entry['label']} | " + " | ".join(cells) + f" | {mean[trained].mean():.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_report(preset: ComparePreset, root: str, methods: list[str]) -> dict:
    """``root/results.json``, ``root/results.md`` and ``root/pictures/*.png``; returns the results."""
    from megatron_harpe.outputs import atomic_output_files
    from megatron_harpe.plots import plot_accuracy_vs_length, plot_niah_heatmap

    lengths = preset.eval_lengths
    table = aggregate(_summaries(root, preset, methods), lengths)
    results = {"preset": preset.summary(), "lengths": lengths, "methods": table}
    panels = {title: {e["label"]: (np.asarray(e["metrics"][key]["mean"]) * scale,
                                   np.asarray(e["metrics"][key]["std"]) * scale) for e in table.values()}
              for key, title, scale, higher in METRICS if higher}
    pictures = {name: os.path.join(root, "pictures", f"niah_{name}.png") for name in table}
    curves = os.path.join(root, "pictures", "accuracy_vs_length.png")
    # Each group of files appears whole or not at all (a rerun of the report replaces them).
    with atomic_output_files([curves, *pictures.values()], force=True, flag="--out") as staged:
        plot_accuracy_vs_length(panels, lengths, staged[curves], trained_length=preset.l1, limits=(0, 100),
                                title=f"compare_methods, preset {preset.name}")
        for name, entry in table.items():
            plot_niah_heatmap(np.asarray(entry["niah_grid_mean"]), lengths, list(preset.eval.niah_depths),
                              staged[pictures[name]], title=f"NIAH: {entry['label']}")
    files = {name: os.path.join(root, name) for name in ("results.json", "results.md")}
    with atomic_output_files(list(files.values()), force=True, flag="--out") as staged:
        with open(staged[files["results.json"]], "w") as f:
            json.dump(results, f, indent=1)
        with open(staged[files["results.md"]], "w") as f:
            f.write(markdown(table, preset))
    return results
