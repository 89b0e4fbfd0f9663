"""The report: means and sample standard deviations over seeds, one table row per method, the pictures."""

import json
import os

import numpy as np
import pytest

from megatron_harpe.command import RunError
from megatron_harpe.compare.evaluate import SUMMARY
from megatron_harpe.compare.presets import PRESETS
from megatron_harpe.compare.report import write_report
from megatron_harpe.compare.runner import Paths

PRESET = PRESETS["ci"].with_seeds(3)
LENGTHS = PRESET.eval_lengths


def _summary(score: float) -> dict:
    by_length = {str(L): score for L in LENGTHS}
    return {"lengths": LENGTHS, "passkey": by_length, "niah": by_length,
            "niah_grid": [[score] * len(LENGTHS) for _ in PRESET.eval.niah_depths],
            "ruler": {t: by_length for t in PRESET.eval.ruler_tasks}, "ruler_average": by_length,
            "perplexity": {str(L): 10 * score for L in LENGTHS}}


def _write(path: str, summary: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f)


def _fill(root: str, scores: dict[str, list[float]]) -> None:
    paths = Paths(root)
    _write(os.path.join(paths.stage0, "eval", SUMMARY), _summary(0.1))
    for method, per_seed in scores.items():
        for index, score in enumerate(per_seed, 1):
            _write(os.path.join(paths.run(method, index), "eval", SUMMARY), _summary(score))


def test_means_and_spread_over_seeds(tmp_path):
    scores = {"harpe_peak_valley": [0.5, 0.7, 0.9], "abf": [0.2, 0.2, 0.2]}
    _fill(str(tmp_path), scores)
    results = write_report(PRESET, str(tmp_path), list(scores))
    harpe = results["methods"]["harpe_peak_valley"]["metrics"]["passkey"]
    assert harpe["mean"] == pytest.approx([0.7] * len(LENGTHS))
    assert harpe["std"] == pytest.approx([np.std([0.5, 0.7, 0.9], ddof=1)] * len(LENGTHS))  # 0.2
    assert results["methods"]["abf"]["metrics"]["perplexity"]["std"] == pytest.approx([0.0] * len(LENGTHS))
    assert results["methods"]["stage0"]["seeds"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| HARPE (peak-valley) | 70.0 +- 20.0 |" in table and "| single-stage ABF | 20.0 +- 0.0 |" in table
    assert table.count("| stage 0 (base 10k, L0) |") == 4  # one row in each metric's table
    assert json.loads((tmp_path / "results.json").read_text())["lengths"] == LENGTHS
    for name in ("accuracy_vs_length", "niah_stage0", "niah_harpe_peak_valley", "niah_abf"):
        assert (tmp_path / "pictures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_run_is_named(tmp_path):
    _fill(str(tmp_path), {"abf": [0.2, 0.2]})  # seed 3 never ran
    with pytest.raises(RunError, match=r"no results for abf: .*runs/abf/seed3/eval/summary\.json is missing"):
        write_report(PRESET, str(tmp_path), ["abf"])
    assert not (tmp_path / "results.md").exists()
