"""The runner's bookkeeping: what resumes, what is refused, what --force removes."""

import json
import os

import pytest

from megatron_harpe.command import UsageError
from megatron_harpe.compare.presets import PRESETS
from megatron_harpe.compare.runner import MANIFEST, Runner, prepare_out

PRESET = PRESETS["ci"]


def test_a_step_runs_once_and_a_failed_step_runs_again(tmp_path):
    log = []
    runner = Runner(PRESET, str(tmp_path), ["abf"], log=log.append)
    calls = []

    def fail():
        calls.append("fail")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        runner._step("train", str(tmp_path / "run" / "train"), fail)
    assert not (tmp_path / "run" / "train.done").exists()
    runner._step("train", str(tmp_path / "run" / "train"), lambda: calls.append("ok"))
    runner._step("train", str(tmp_path / "run" / "train"), lambda: calls.append("again"))
    assert calls == ["fail", "ok"]
    assert json.loads((tmp_path / "run" / "train.done").read_text())["step"] == "train"
    assert log[-1].endswith("train: done before, skipped")


def test_resume_takes_the_same_preset_with_more_seeds(tmp_path):
    out = str(tmp_path / "out")
    prepare_out(out, PRESET.summary(), force=False)
    os.makedirs(os.path.join(out, "runs", "abf"))
    prepare_out(out, PRESET.with_seeds(3).summary(), force=False)  # resumes: nothing removed
    assert os.path.isdir(os.path.join(out, "runs", "abf"))
    prepare_out(out, {**PRESET.summary(), "description": "reworded"}, force=False)  # prose is not a setting
    with pytest.raises(UsageError, match=r"holds a comparison with other settings \(.*\bl0\b.*\bshape\b.*\)"):
        prepare_out(out, PRESETS["cpu"].summary(), force=False)


def test_force_removes_only_what_a_comparison_writes(tmp_path):
    out = tmp_path / "out"
    prepare_out(str(out), PRESET.summary(), force=False)
    (out / "runs" / "abf").mkdir(parents=True)
    (out / "results.md").write_text("old")
    prepare_out(str(out), PRESETS["cpu"].summary(), force=True)
    assert sorted(os.listdir(out)) == [MANIFEST]
    assert json.loads((out / MANIFEST).read_text())["name"] == "cpu"
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(UsageError, match="holds mine.txt"):
        prepare_out(str(out), PRESET.summary(), force=True)
    assert (out / "mine.txt").read_text() == "the user's" and (out / MANIFEST).exists()


def test_a_failed_command_names_its_log_and_shows_its_end(tmp_path):
    from megatron_harpe.compare.logs import CompareError, run_entry

    def entry(argv):
        print("loading", argv[0])
        print("error: the checkpoint is damaged")
        return 1

    log = tmp_path / "export.log"
    with pytest.raises(CompareError, match=r"(?s)export failed \(exit 1\):.*error: the checkpoint is damaged\n"
                                           r"whole log: .*export\.log") as raised:
        run_entry(entry, ["ckpt"], str(log), "export")
    assert raised.value.exit_code == 1
    assert log.read_text().splitlines() == ["$ entry ckpt", "loading ckpt", "error: the checkpoint is damaged"]
