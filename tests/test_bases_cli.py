import argparse
import json
import os
import re

import pytest

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES
from megatron_harpe.bases_cli import add_base_source_arguments, bases_from_arguments, main


def test_prints_one_base_per_head_and_writes_a_png(tmp_path, capsys):
    png = tmp_path / "bases.png"
    assert main(["--strategy", "uniform", "--num-bases", "4", "--base-min", "1e4", "--base-max", "4e4",
                 "--target-length", "4096", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "10000.0" in out and "40000.0" in out and "waveform ripple" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing picture is not overwritten without --force.
    assert main(["--bases", "1e4,2e4", "--target-length", "4096", "--plot", str(png)]) == 2
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
    (["--bases", "1e6,2e6", "--base-max", "9e6"], r"--base-max configures a strategy's search"),
    (["--strategy", "geometric", "--stride", "1e4"], r"--strategy geometric does not use it"),
    (["--num-bases", "4", "--force"], r"no --plot was given"),
])
def test_contradicting_flags_are_refused(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and not captured.out


def test_num_bases_equal_to_the_list_is_accepted(capsys):
    assert main(["--bases", "1e4,2e4,4e4", "--num-bases", "3", "--target-length", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bases"] == [1e4, 2e4, 4e4]


def test_shared_flags_default_list_and_search(capsys):
    # What plot_harpe_bases reads through the same two functions: its default is the paper's list.
    parser = argparse.ArgumentParser()
    add_base_source_arguments(parser, default="the paper's list")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--target-length", type=int, default=4096)
    read = lambda *argv: bases_from_arguments(parser.parse_args(argv), default_bases="paper-llama2-7b")
    assert read() == list(PAPER_LLAMA2_7B_BASES)
    assert read("--strategy", "uniform", "--num-bases", "3", "--base-min", "1e4", "--base-max", "3e4") == [1e4, 2e4, 3e4]
    with pytest.raises(ValueError, match=r"default list .* holds 32 bases but --num-bases is 8"):
        read("--num-bases", "8")


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
    assert main(["--bases", "1e4,2e4", "--target-length", "4096", "--plot", str(tmp_path / "b.png")]) == 2
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and not captured.out
    assert os.listdir(tmp_path) == []
