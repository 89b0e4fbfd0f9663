"""Results in --out are never replaced without --force, and appear complete or not at all (issue 15, item 1)."""

import json
import os

import pytest

from megatron_harpe.eval.cli import eval_niah, eval_perplexity


def niah_argv(model, out, *extra):
    return ["--model", model, "--out", str(out), "--lengths", "200", "--depths", "0,1", "--max-new-tokens", "2",
            *extra]


def test_a_users_picture_is_kept_unless_forced(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "niah.png").write_bytes(b"the user's own heatmap")
    assert eval_niah(niah_argv(tiny_model_dir, tmp_path)) == 1
    assert "niah.png exists: choose another --out or pass --force" in capsys.readouterr().err
    assert (tmp_path / "niah.png").read_bytes() == b"the user's own heatmap"
    assert sorted(os.listdir(tmp_path)) == ["niah.png"]  # refused before anything ran
    assert eval_niah(niah_argv(tiny_model_dir, tmp_path, "--force")) == 0
    assert (tmp_path / "niah.png").read_bytes().startswith(b"\x89PNG")


def test_a_rerun_redraws_its_own_picture_but_not_an_edited_one(tmp_path, tiny_model_dir, capsys):
    assert eval_niah(niah_argv(tiny_model_dir, tmp_path)) == 0
    assert eval_niah(niah_argv(tiny_model_dir, tmp_path)) == 0  # the picture the results recorded
    picture = (tmp_path / "niah.png").read_bytes()
    (tmp_path / "niah.png").write_bytes(picture + b"annotated by hand")
    assert eval_niah(niah_argv(tiny_model_dir, tmp_path)) == 1
    assert "niah.png exists" in capsys.readouterr().err
    assert (tmp_path / "niah.png").read_bytes() == picture + b"annotated by hand"


def test_a_failed_heatmap_leaves_no_picture(tmp_path, tiny_model_dir, monkeypatch):
    import megatron_harpe.plots as plots

    def half_written(grid, lengths, depths, path, title=""):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_niah_heatmap", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        eval_niah(niah_argv(tiny_model_dir, tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["niah.json"]  # the finished grid (resumable), no picture, no staging


def test_perplexity_results_are_kept_unless_forced(tmp_path, tiny_model_dir, capsys):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path), "--lengths", "64", "--stride", "32"]
    (tmp_path / "perplexity.json").write_text('{"mine": true}')
    assert eval_perplexity(argv) == 1
    assert "perplexity.json exists" in capsys.readouterr().err
    assert json.loads((tmp_path / "perplexity.json").read_text()) == {"mine": True}
    assert eval_perplexity(argv + ["--force"]) == 0
    assert set(json.loads((tmp_path / "perplexity.json").read_text())["perplexity"]) == {"64"}
    assert sorted(os.listdir(tmp_path)) == ["perplexity.json"]
