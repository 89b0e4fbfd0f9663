import json

from megatron_harpe.bases_cli import main


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
