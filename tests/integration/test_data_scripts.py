"""examples/prepare_*_data*.sh: the data chain from the shell (synthetic sources -> tokenized -> mixture)."""

import os
import subprocess

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_harpe.data.synthetic import make_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "prepare_long_context_data.sh")


def run(env, *args):
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def test_missing_settings_are_named(tmp_path):
    done = run({"SOURCES_DIR": "", "TOKENIZER_MODEL": ""})
    assert done.returncode == 2
    assert "OUTDIR" in done.stderr and "SOURCES_DIR" in done.stderr and "TOKENIZER_MODEL" in done.stderr


def test_prepare_long_context_data(tmp_path):
    made = make_corpus(str(tmp_path / "corpus"), docs_per_source=40, length_scale=0.05, vocab_size=500,
                       sources=("c4", "book"))
    (tmp_path / "corpus" / "sources" / "README.md").write_text("# where these came from\n")  # not a source
    env = {"SOURCES_DIR": str(tmp_path / "corpus" / "sources"), "TOKENIZER_MODEL": made["tokenizer_model"],
           "SEQ_LENGTH": "128", "LONG_THRESHOLD": "300", "WORKERS": "1"}
    done = run(env, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: not a source, left out: README.md" in done.stderr
    assert sorted(os.listdir(tmp_path / "out" / "tokenized")) == sorted(
        f"{source}_text_document.{ext}" for source in ("c4", "book") for ext in ("bin", "idx"))
    assert f"DATA_PATH={tmp_path / 'out' / 'mixture'}" in done.stdout
    mixture = IndexedDataset(str(tmp_path / "out" / "mixture"))
    assert int(mixture.sequence_lengths.sum()) % 128 == 0 and len(mixture) > 0
    assert (tmp_path / "out" / "mixture.length_histogram.png").exists()
    # A rerun reuses the tokenized sources and will not overwrite the mixture without --force.
    again = run(env, tmp_path / "out")
    assert again.returncode == 1 and "reusing" in again.stdout and "pass --force" in again.stderr


def test_prepare_tiny_data_refuses_a_bad_retrieval_docs(tmp_path):
    """examples/prepare_tiny_data_cpu.sh (the quickstart's data step) checks its setting before any work."""
    done = subprocess.run([os.path.join(REPO, "examples", "prepare_tiny_data_cpu.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "RETRIEVAL_DOCS": "many"})
    assert done.returncode == 2 and "RETRIEVAL_DOCS=many: give a whole number (0 skips)" in done.stderr
    assert not (tmp_path / "out").exists()
