"""Needle-in-a-Haystack on a tiny random Hugging Face Llama: results, heatmap, resume, and the scoring rule."""

import json
import os

import pytest
import torch

from megatron_harpe.eval.cli import eval_niah
from megatron_harpe.eval.scoring import passkey_score, string_match_all


def test_string_match_all_on_known_answers():
    assert string_match_all(" eat a sandwich and sit in Dolores Park on a sunny day.", "Eat a sandwich and sit in "
                            "Dolores Park on a sunny day") == 1.0
    assert string_match_all("The number is 1234567", ["1234567", "7654321"]) == 0.5
    assert string_match_all("no idea", "1234567") == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])
    assert passkey_score(" 71432. Remember", 71432) == 1.0
    assert passkey_score(" 714321", 71432) == 0.0 and passkey_score("none", 1) == 0.0


def test_niah_grid_writes_results_and_heatmap(tmp_path, tiny_model_dir, capsys):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path), "--lengths", "200,400", "--depths", "0,0.5,1",
            "--max-new-tokens", "4", "--batch-size", "2"]
    assert eval_niah(argv) == 0
    results = json.loads((tmp_path / "niah.json").read_text())
    assert len(results["cells"]) == 6
    for cell in results["cells"].values():
        assert 0.0 <= cell["score"] <= 1.0 and cell["answer"] == "eat a sandwich and sit in Dolores Park on a sunny day"
        assert cell["needle_position"] <= cell["length"]
    assert results["mean_score"] == pytest.approx(sum(c["score"] for c in results["cells"].values()) / 6)
    assert (tmp_path / "niah.png").stat().st_size > 10_000
    assert "mean score" in capsys.readouterr().out


def test_niah_resumes_and_refuses_other_settings(tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path), "--lengths", "200", "--depths", "0,1",
            "--max-new-tokens", "2"]
    assert eval_niah(argv) == 0
    first = json.loads((tmp_path / "niah.json").read_text())
    first["cells"].pop("200@1")  # as if the run had stopped after one cell
    (tmp_path / "niah.json").write_text(json.dumps(first))
    import megatron_harpe.eval.model as model_module

    calls = []
    original = model_module.EvalModel.generate
    monkeypatch.setattr(model_module.EvalModel, "generate",
                        lambda self, prompts, n: calls.append(len(prompts)) or original(self, prompts, n))
    assert eval_niah(argv) == 0
    assert calls == [1]  # only the missing cell ran
    assert set(json.loads((tmp_path / "niah.json").read_text())["cells"]) == {"200@0", "200@1"}
    assert eval_niah(argv[:-4] + ["--depths", "0.5", "--max-new-tokens", "2"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_custom_needle_and_haystack(tmp_path, tiny_model_dir):
    text = tmp_path / "essay.txt"
    text.write_text("A first paragraph about rivers. It goes on.\n\nA second one about gardens, short.\n")
    assert eval_niah(["--model", tiny_model_dir, "--out", str(tmp_path / "r"), "--lengths", "300", "--depths", "0.5",
                      "--needle", "The secret colour is teal.", "--question", "What is the secret colour?",
                      "--answer", "teal", "--haystack-file", str(text), "--max-new-tokens", "2"]) == 0
    (cell,) = json.loads((tmp_path / "r" / "niah.json").read_text())["cells"].values()
    assert cell["answer"] == "teal"


def test_bad_model_dir(tmp_path, capsys):
    assert eval_niah(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--lengths", "100"]) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_scores_flow_into_results(tmp_path, tiny_model_dir, monkeypatch):
    """A model that answers right scores 1 in every cell (the random one above scores 0)."""
    import megatron_harpe.eval.model as model_module

    answer = " Eat a sandwich and sit in Dolores Park on a sunny day."
    monkeypatch.setattr(model_module.EvalModel, "generate", lambda self, prompts, n: [answer] * len(prompts))
    assert eval_niah(["--model", tiny_model_dir, "--out", str(tmp_path), "--lengths", "200", "--depths", "0,1"]) == 0
    results = json.loads((tmp_path / "niah.json").read_text())
    assert results["mean_score"] == 1.0


def test_passkey_prompts_hold_the_key(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """An oracle that reads the key out of the prompt scores 1; the random model is scored, whatever it says."""
    import re

    import megatron_harpe.eval.model as model_module
    from megatron_harpe.eval.cli import eval_passkey

    argv = ["--model", tiny_model_dir, "--lengths", "200,300", "--trials", "3"]
    assert eval_passkey(argv + ["--out", str(tmp_path / "random")]) == 0
    random_run = json.loads((tmp_path / "random" / "passkey.json").read_text())
    assert len(random_run["cells"]) == 6 and set(random_run["mean_by_length"]) == {"200", "300"}

    def oracle(self, prompts, n):
        return [" " + re.search(r"The pass key is (\d+)", self.decode(p)).group(1) + "." for p in prompts]

    monkeypatch.setattr(model_module.EvalModel, "generate", oracle)
    assert eval_passkey(argv + ["--out", str(tmp_path / "oracle")]) == 0
    assert json.loads((tmp_path / "oracle" / "passkey.json").read_text())["mean_score"] == 1.0
    assert "passkey accuracy 1.00" in capsys.readouterr().out


def test_sliding_window_perplexity_matches_a_full_forward(tiny_model_dir):
    import math

    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.eval.model import load_eval_model
    from megatron_harpe.eval.perplexity import sliding_window_perplexity

    model = load_eval_model(tiny_model_dir, "cpu", "fp32")
    ids = [model.bos_id] + model.encode(FillerText(3).document(300))[:399]
    with torch.no_grad():
        full = math.exp(float(model.model(torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    # A window as long as the text scores every token once, from all of its context: one forward pass.
    assert sliding_window_perplexity(model, ids, context_length=len(ids), stride=256) == pytest.approx(full, rel=1e-5)
    # Shorter windows see less context: a different (finite) number, every token still scored once.
    short = sliding_window_perplexity(model, ids, context_length=128, stride=64)
    assert math.isfinite(short) and short != pytest.approx(full, rel=1e-6)


def test_eval_perplexity_command(tmp_path, tiny_model_dir):
    from megatron_harpe.eval.cli import eval_perplexity

    assert eval_perplexity(["--model", tiny_model_dir, "--out", str(tmp_path), "--lengths", "64,128",
                            "--stride", "32"]) == 0
    table = json.loads((tmp_path / "perplexity.json").read_text())["perplexity"]
    assert set(table) == {"64", "128"} and all(v > 1 for v in table.values())
