"""The eval tools on one exported model, at the preset's lengths (L0 ... 2 x L1), and one summary of their results.

The commands run here through their own entry points (``harpe-eval-passkey``, ``harpe-eval-niah`` for the
length x depth grid and for RULER's NIAH tasks, ``harpe-eval-perplexity``), so transformers loads once for a whole
comparison. The grid's needle is RULER's random magic number, not Kamradt's San Francisco sentence: that one is
the same sentence every time, so a model trained on retrieval documents could answer it from memory.
"""

from __future__ import annotations

import json
import os

from megatron_harpe.compare.logs import run_entry
from megatron_harpe.compare.presets import ComparePreset

SUMMARY = "summary.json"


def _commands(hf: str, out: str, preset: ComparePreset) -> list[tuple[str, str, list[str]]]:
    g = preset.eval
    # The tools' defaults: fp32 on a CPU, bf16 on a GPU.
    common = ["--model", hf, "--lengths", ",".join(map(str, preset.eval_lengths))]
    batch = ["--batch-size", str(g.batch_size)]
    return [
        ("passkey", "eval_passkey", [*common, *batch, "--out", os.path.join(out, "passkey"),
                                     "--trials", str(g.passkey_trials)]),
        ("niah", "eval_niah", [*common, *batch, "--out", os.path.join(out, "niah"), "--needle-style", "ruler",
                               "--depths", ",".join(map(str, g.niah_depths)), "--max-new-tokens", "16"]),
        ("ruler", "eval_niah", [*common, *batch, "--out", os.path.join(out, "ruler"), "--suite", "ruler",
                                "--tasks", ",".join(g.ruler_tasks), "--samples", str(g.ruler_samples)]),
        ("perplexity", "eval_perplexity", [*common, "--out", os.path.join(out, "perplexity"),
                                           "--stride", str(g.perplexity_stride)]),
    ]


def evaluate(hf: str, out: str, preset: ComparePreset) -> dict:
    """Run every evaluation (each resumes where it stopped), then write and return ``out/summary.json``."""
    from megatron_harpe.eval import cli

    os.makedirs(out, exist_ok=True)
    for name, command, argv in _commands(hf, out, preset):
        run_entry(getattr(cli, command), argv, os.path.join(out, f"{name}.log"), f"{command} on {hf}")
    summary = summarize(out, preset)
    with open(os.path.join(out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(out: str, preset: ComparePreset) -> dict:
    """Scores in [0, 1] by length (strings as JSON keys), the NIAH grid ``[depth][length]``, perplexity by length."""
    import numpy as np

    from megatron_harpe.eval.grid import score_grid
    from megatron_harpe.eval.ruler import results_file

    def load(path):
        with open(path) as f:
            return json.load(f)

    lengths = preset.eval_lengths
    passkey = load(os.path.join(out, "passkey", "passkey.json"))
    niah = load(os.path.join(out, "niah", "niah.json"))
    ruler = {t: load(results_file(os.path.join(out, "ruler"), t))["mean_by_length"] for t in preset.eval.ruler_tasks}
    perplexity = load(os.path.join(out, "perplexity", "perplexity.json"))["perplexity"]
    grid = score_grid(niah, lengths, list(preset.eval.niah_depths))
    return {
        "lengths": lengths,
        "passkey": passkey["mean_by_length"],
        "niah": niah["mean_by_length"],
        "niah_grid": grid.tolist(),
        "ruler": ruler,
        "ruler_average": {str(L): float(np.mean([ruler[t][str(L)] for t in ruler])) for L in lengths},
        "perplexity": perplexity,
    }
