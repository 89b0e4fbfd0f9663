"""RULER's 8 NIAH tasks: sample construction per task, and the suite through tools/eval_niah.py."""

import json
import re

import pytest
import sentencepiece

from megatron_harpe.eval.ruler import TASKS, ruler_sample


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    path = train_sentencepiece([FillerText(s).document(3000) for s in range(3)],
                               str(tmp_path_factory.mktemp("spm") / "m"), vocab_size=600)
    return sentencepiece.SentencePieceProcessor(model_file=path)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_samples(spm, task):
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = TASKS[task]
    sample = ruler_sample(task, spm.encode, spm.decode, context_tokens=1200, seed=3)
    assert len(sample.input_ids) == 1200
    text = spm.decode(sample.input_ids)
    assert len(sample.answers) == n_values * n_queries
    for answer in sample.answers:  # every expected value is in the context, inside its needle
        assert re.search(rf"One of the special magic (numbers|uuids) for \S+ is: {re.escape(answer)}\.", text)
        if value_kind == "uuids":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", answer)
        else:
            assert re.fullmatch(r"\d{7}", answer)
    assert text.startswith("Some special magic") and text.rstrip().endswith("mentioned in the provided text are")
    needles = len(re.findall(r"One of the special magic", text))
    if haystack == "needle":
        assert needles > 5  # distractor needles make the haystack
    else:
        assert needles == n_keys * n_values
    if haystack == "noise":
        assert "The grass is green." in text
    assert ruler_sample(task, spm.encode, spm.decode, context_tokens=1200, seed=3).input_ids == sample.input_ids


def test_too_short_and_unknown(spm):
    with pytest.raises(ValueError, match="too short"):
        ruler_sample("multiquery", spm.encode, spm.decode, context_tokens=40, seed=0)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler_sample("vt", spm.encode, spm.decode, context_tokens=400, seed=0)


def test_ruler_suite_command(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import megatron_harpe.eval.model as model_module
    from megatron_harpe.eval.cli import eval_niah

    argv = ["--model", tiny_model_dir, "--out", str(tmp_path), "--suite", "ruler", "--lengths", "600,800",
            "--samples", "2", "--max-new-tokens", "2", "--batch-size", "2"]
    assert eval_niah(argv) == 0
    out = capsys.readouterr().out
    assert "average" in out and "Table 4" in out
    for task in TASKS:
        results = json.loads((tmp_path / f"ruler_{task}.json").read_text())
        assert len(results["cells"]) == 4 and set(results["mean_by_length"]) == {"600", "800"}

    def oracle(self, prompts, n):  # reads the asked keys' values out of the prompt
        outputs = []
        for prompt in prompts:
            text = self.decode(prompt)
            asked = re.search(r"What are all the special magic \w+ for (.+?) mentioned", text).group(1)
            keys = [*re.split(r", and |, ", asked)]
            values = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", text)]
            outputs.append(" " + ", ".join(values) + ".")
        return outputs

    monkeypatch.setattr(model_module.EvalModel, "generate", oracle)
    assert eval_niah(argv[:3] + [str(tmp_path / "oracle")] + argv[4:]) == 0
    for task in TASKS:
        assert json.loads((tmp_path / "oracle" / f"ruler_{task}.json").read_text())["mean_score"] == 1.0, task
