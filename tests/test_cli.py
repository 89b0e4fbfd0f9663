"""harpe-select-bases (megatron_harpe.cli:select_bases): bases from a list or a search, a table or JSON, a picture."""

import json
import os
import re

import pytest

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES
from megatron_harpe.cli import select_bases as main


def test_prints_one_base_per_head_and_writes_a_png(tmp_path, capsys):
    png = tmp_path / "bases.png"
    assert main(["--strategy", "uniform", "--num-bases", "4", "--base-min", "1e4", "--base-max", "4e4",
                 "--target-length", "4096", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "10000.0" in out and "40000.0" in out and "waveform ripple" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing picture is not overwritten without --force (exit 1: an output that may not be replaced).
    assert main(["--bases", "1e4,2e4", "--target-length", "4096", "--plot", str(png)]) == 1
    assert "exists" in capsys.readouterr().err


def test_preset_as_json(capsys):
    assert main(["--bases", "paper-llama2-7b", "--json", "--target-length", "8192"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["bases"]) == 32 and data["bases"][0] == 1e6


def test_bad_input_is_a_clear_error(capsys):
    assert main(["--bases", "1e6,oops"]) == 2
    assert "cannot read 'oops'" in capsys.readouterr().err
    assert main(["--strategy", "peak_valley", "--num-bases", "64", "--stride", "1e6"]) == 2
    assert "lower the stride" in capsys.readouterr().err


# Contradicting flags are refused, never silently ignored (issue 15, item 5); the misuse table has the command lines.
@pytest.mark.parametrize("argv, message", [
    (["--bases", "paper-llama2-7b", "--num-bases", "8"], r"holds 32 bases but --num-bases is 8"),
    (["--bases", "1e6,2e6", "--base-max", "9e6"], r"--base-max set the base search of --strategy"),
    (["--strategy", "geometric", "--stride", "1e4"], r"--strategy geometric does not use it"),
    (["--num-bases", "4", "--force"], r"no --plot was given"),
    (["--num-bases", "4", "--abf-base", "1e6"], r"--abf-base only draws in the --plot picture"),
])
def test_contradicting_flags_are_refused(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and not captured.out


def test_num_bases_equal_to_the_list_is_accepted(capsys):
    assert main(["--bases", "1e4,2e4,4e4", "--num-bases", "3", "--target-length", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bases"] == [1e4, 2e4, 4e4]


def test_plot_draws_against_single_base_abf(tmp_path, capsys, monkeypatch):
    # What tools/plot_harpe_bases.py drew, now --plot: the ABF line (--abf-base) and, for 32 bases, Table 2 beside them.
    from megatron_harpe import plots

    drawn = []
    real = plots.plot_bases
    monkeypatch.setattr(plots, "plot_bases", lambda bases, path, **kw: drawn.append(kw) or real(bases, path, **kw))
    assert main(["--bases", "paper-llama2-7b", "--target-length", "8192", "--plot", str(tmp_path / "p.png")]) == 0
    assert drawn[-1]["single_base"] == 5e6 and list(drawn[-1]["compare"]) == list(PAPER_LLAMA2_7B_BASES)
    assert main(["--strategy", "uniform", "--num-bases", "8", "--target-length", "8192", "--abf-base", "1e6",
                 "--plot", str(tmp_path / "u.png")]) == 0
    assert drawn[-1]["single_base"] == 1e6 and drawn[-1]["compare"] is None
    assert (tmp_path / "u.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out


def test_json_stays_json_with_a_plot(tmp_path, capsys):
    png = tmp_path / "b.png"
    assert main(["--bases", "1e4,2e4", "--target-length", "4096", "--json", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bases"] == [1e4, 2e4] and "wrote" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["b.png"]  # no staging left beside it


def test_a_failed_plot_prints_nothing_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from megatron_harpe import plots

    def full_disk(bases, path, **kwargs):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_bases", full_disk)
    assert main(["--bases", "1e4,2e4", "--target-length", "4096", "--plot", str(tmp_path / "b.png")]) == 1
    captured = capsys.readouterr()
    assert "no space left on the device" in captured.err and "b.png" in captured.err and not captured.out
    assert os.listdir(tmp_path) == []
