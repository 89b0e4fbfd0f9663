import json

from megatron_harpe.eval.cli import compare_niah
from megatron_harpe.eval.grid import cell_key, score_grid


def fake_results(path, scores, lengths=(100, 200), depths=(0.0, 1.0)):
    cells = {cell_key(L, d): {"length": L, "coordinate": d, "score": scores[i][j]}
             for i, d in enumerate(depths) for j, L in enumerate(lengths)}
    path.write_text(json.dumps({"settings": {"lengths": list(lengths), "depths": list(depths)}, "cells": cells}))
    return str(path)


def test_compare_two_results(tmp_path, capsys):
    a = fake_results(tmp_path / "a.json", [[1, 1], [1, 0]])
    b = fake_results(tmp_path / "b.json", [[1, 0], [0, 0]])
    assert score_grid(json.loads((tmp_path / "a.json").read_text()), [100, 200], [0.0, 1.0]).tolist() == \
        [[1, 1], [1, 0]]
    assert compare_niah([a, b, "--labels", "HARPE", "ABF", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "HARPE: mean 0.750" in out and "ABF: mean 0.250" in out
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert compare_niah([a, b, "--out", str(tmp_path / "c.png")]) == 1  # exists, no --force
    other = fake_results(tmp_path / "o.json", [[1, 1, 1], [1, 1, 1]], lengths=(100, 200, 300))
    assert compare_niah([a, other, "--out", str(tmp_path / "d.png")]) == 1
    assert "different lengths or depths" in capsys.readouterr().err
