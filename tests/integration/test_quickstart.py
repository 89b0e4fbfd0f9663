"""The README's main-job command, end to end on a reduced setting: data -> training -> export -> evaluation."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "quickstart_cpu.sh")
# A hang guard, not a speed limit (the whole chain takes minutes on 2 cores, several times that on a loaded machine).
HANG_GUARD_S = 1800


@pytest.mark.multirank
def test_quickstart_runs_the_whole_chain(tmp_path):
    out = tmp_path / "qs"
    from megatron_harpe.distributed import free_port

    # A fresh port: this process may hold a process group whose MASTER_PORT the children would inherit.
    env = dict(os.environ, DOCS_PER_SOURCE="60", RETRIEVAL_DOCS="400", TRAIN_ITERS="10", PYTHONWARNINGS="ignore",
               MASTER_PORT=str(free_port()))
    run = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for path in ("demo/bases.json", "data/mixture.bin", "data/mixture.length_histogram.png",
                 "data/retrieval/parts/stage0.jsonl", "data/retrieval_stage0_text_document.bin", "hf/config.json",
                 "hf/modeling_harpe_llama.py", "hf/tokenizer.model", "eval/niah/niah.png"):
        assert (out / path).is_file(), path
    # The model is trained on the retrieval corpus, with its tokenizer, at 128 tokens: one document per sample.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    retrieval = IndexedDataset(str(out / "data" / "retrieval_stage0_text_document"))
    assert len(retrieval) == 400 and set(retrieval.sequence_lengths.tolist()) == {128}
    tokenizer = (out / "data" / "retrieval" / "tokenizer.model").read_bytes()
    assert (out / "hf" / "tokenizer.model").read_bytes() == tokenizer
    config = json.loads((out / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], len(config["harpe_bases"])) == (128, 2, 2)
    metrics = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert max(m["iteration"] for m in metrics) == 10
    niah = json.loads((out / "eval" / "niah" / "niah.json").read_text())
    assert niah["settings"]["style"] == "ruler" and niah["settings"]["lengths"] == [96, 112, 128]
    assert len(niah["cells"]) == 15 and 0.0 <= niah["mean_score"] <= 1.0  # 10 iterations: no score is promised
    assert set(json.loads((out / "eval" / "passkey" / "passkey.json").read_text())["mean_by_length"]) == {"96", "128"}
    assert "Everything is under" in run.stdout
    # the refusal comes before any step: no second run of the chain
    again = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 1 and "pass --force" in again.stderr
