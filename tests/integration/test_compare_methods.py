"""examples/compare_methods_cpu.sh on the ``ci`` preset: every method through the whole chain, well-formed results,
and a second run that redoes nothing. It asserts no outcome: at this size the scores mean nothing."""

import json
import os
import subprocess

import pytest

from megatron_harpe.compare.methods import METHODS
from megatron_harpe.compare.presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "compare_methods_cpu.sh")
HANG_GUARD_S = 1800  # not a speed limit: minutes on 2 idle cores
PRESET = PRESETS["ci"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    env = dict(os.environ, PRESET="ci", PYTHONWARNINGS="ignore")
    run = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run, env


def test_every_method_is_trained_exported_and_evaluated(comparison):
    out, run, _ = comparison
    results = json.loads((out / "results.json").read_text())
    lengths = PRESET.eval_lengths
    assert results["lengths"] == lengths and list(results["methods"]) == ["stage0", *METHODS]
    for name, entry in results["methods"].items():
        for metric, values in entry["metrics"].items():
            assert len(values["mean"]) == len(lengths), (name, metric)
            if metric == "perplexity":
                assert all(v > 1 for v in values["mean"]), name
            else:
                assert all(0.0 <= v <= 1.0 for v in values["mean"]), (name, metric)
        assert (out / "pictures" / f"niah_{name}.png").read_bytes()[:8] == PNG
    assert (out / "pictures" / "accuracy_vs_length.png").read_bytes()[:8] == PNG
    table = (out / "results.md").read_text()
    assert table.count("| method |") == 4 and table.count("| YaRN |") == 4
    assert "results.md" in run.stdout


def test_each_run_trained_what_its_method_says(comparison):
    out, _, _ = comparison
    logs = out / "logs"
    assert "HARPE bases (2, one per query group, uniform)" in (logs / "harpe_uniform-seed1-stage1.log").read_text()
    assert "one per query group, peak_valley" in (logs / "harpe_peak_valley-seed1-stage1.log").read_text()
    for method in METHODS:  # from stage 0's checkpoint, not from scratch
        first = (logs / f"{method}-seed1-stage1.log").read_text()
        assert "attempting to finetune with checkpoint in " + str(out / "stage0" / "checkpoints") in first, method
    runs = out / "runs"
    assert [(runs / "abf_multistage" / "seed1" / f"stage{i}" / "checkpoints").is_dir() for i in (1, 2, 3)] == [True] * 3

    def rope(method):
        return json.loads((runs / method / "seed1" / "hf" / "config.json").read_text())["rope_parameters"]

    assert rope("pi")["rope_type"] == "linear" and rope("pi")["factor"] == PRESET.extension
    assert rope("yarn")["rope_type"] == "yarn" and rope("yarn")["original_max_position_embeddings"] == PRESET.l0
    assert rope("abf")["rope_theta"] == PRESET.abf_base


def test_a_second_run_redoes_nothing(comparison):
    out, _, env = comparison
    before = (out / "results.md").read_text()
    again = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert steps and all(line.endswith("done before, skipped") for line in steps), steps
    assert (out / "results.md").read_text() == before
