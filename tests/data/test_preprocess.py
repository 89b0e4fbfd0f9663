import gzip
import json
import os
import subprocess
import sys

import numpy as np

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_harpe.data.cli import preprocess_data as main
from megatron_harpe.data.sentences import SentenceSplitter, train_punkt_parameters

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def run(spm_model, *args):
    argv = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model, *map(str, args)]
    return main(argv)


def documents(prefix):
    """Each document of an indexed dataset as (tokens, [sequence lengths])."""
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    out = []
    for d in range(len(bounds) - 1):
        sequences = [dataset[i] for i in range(bounds[d], bounds[d + 1])]
        tokens = np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int64)
        out.append((tokens.tolist(), [len(s) for s in sequences]))
    return out


def reference_documents(tokenizer, texts, append_eod, split=None):
    """Megatron-LM's preprocess_data.py encode(), written plainly: tokenize each sentence, drop empty ones, EOD last."""
    out = []
    for text in texts:
        sentences = text if isinstance(text, list) else split(text) if split else [text]
        ids, lengths = [], []
        for sentence in sentences:
            sentence_ids = tokenizer.tokenize(sentence)
            if sentence_ids:
                ids += sentence_ids
                lengths.append(len(sentence_ids))
        if ids and append_eod:
            ids.append(tokenizer.eod)
            lengths[-1] += 1
        out.append((ids, lengths))
    return out


def test_documents_equal_megatron_lm_encoding(tmp_path, spm_model, megatron_tokenizer, corpus_texts):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(corpus_texts)])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "out", "--append-eod", "--workers", 0) == 0
    got = documents(str(tmp_path / "out_text_document"))
    assert got == reference_documents(megatron_tokenizer, corpus_texts, append_eod=True)
    assert IndexedDataset(str(tmp_path / "out_text_document")).index.dtype == np.uint16


def test_workers_and_chunking_do_not_change_the_stream(tmp_path, spm_model, corpus_texts, monkeypatch):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus_texts * 4])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "one", "--append-eod") == 0
    import megatron_harpe.data.inputs as inputs

    small_chunks = inputs.read_chunks
    monkeypatch.setattr("megatron_harpe.data.preprocess.read_chunks", lambda paths: small_chunks(paths, 2000))
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "two", "--append-eod",
               "--workers", 2) == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()


def test_split_sentences_multiple_keys_and_presplit_lists(tmp_path, spm_model, megatron_tokenizer, corpus_texts,
                                                          monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    records = [{"text": t, "title": t[:30], "sents": ["Already split.", "", "Two."]} for t in corpus_texts[:12]]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "s", "--json-keys", "text", "title", "sents",
               "--split-sentences", "--append-eod") == 0
    splitter = SentenceSplitter(train_punkt_parameters(r["text"] for r in records))
    for key in ("text", "title", "sents"):
        got = documents(str(tmp_path / f"s_{key}_sentence"))
        assert got == reference_documents(megatron_tokenizer, [r[key] for r in records], True, splitter.split), key
    assert max(len(lengths) for _, lengths in documents(str(tmp_path / "s_text_sentence"))) > 3


def test_plain_text_files_and_gzip(tmp_path, spm_model, megatron_tokenizer, corpus_texts):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, text in enumerate(corpus_texts[:5]):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    assert run(spm_model, "--input", folder, "--output-prefix", tmp_path / "books") == 0
    assert documents(str(tmp_path / "books_text_document")) == reference_documents(
        megatron_tokenizer, corpus_texts[:5], append_eod=False)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[5:9]))
    assert run(spm_model, "--input", tmp_path / "c.jsonl.gz", "--output-prefix", tmp_path / "gz", "--append-eod") == 0
    assert documents(str(tmp_path / "gz_text_document")) == reference_documents(
        megatron_tokenizer, corpus_texts[5:9], append_eod=True)


def _roundtrip_sequence_length(total_tokens):
    # A length that tiles the token stream exactly (GPTDataset drops a partial last sample).
    return next((n for n in range(64, 400) if (total_tokens - 1) % n == 0), total_tokens - 1)


def test_text_to_gptdataset_to_text(tmp_path, spm_model, megatron_tokenizer, corpus_texts):
    """JSONL -> .bin/.idx -> megatron-core GPTDataset samples -> detokenized documents equal the input."""
    texts = [t for t in corpus_texts if t.strip() and "\u2581" not in t]  # U+2581 decodes as a space (sentencepiece)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "rt", "--append-eod", "--workers", 2) == 0
    prefix = str(tmp_path / "rt_text_document")
    dataset = IndexedDataset(prefix)  # kept alive: its arrays are views of a memory map closed on deletion
    total = int(dataset.sequence_lengths.sum())
    length = _roundtrip_sequence_length(total)
    config = GPTDatasetConfig(random_seed=5, sequence_length=length, blend=([prefix], None), split="1,0,0",
                              path_to_cache=str(tmp_path / "cache"), tokenizer=megatron_tokenizer,
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False)
    samples = (total - 1) // length
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, None, None], lambda: True, config).build()
    assert len(train) == samples
    # Undo GPTDataset's sample shuffle: consecutive samples overlap by the one label token.
    unshuffle = np.argsort(train.shuffle_index)
    pieces = [train[int(i)] for i in unshuffle]
    stream = np.concatenate([p["tokens"].numpy() for p in pieces] + [pieces[-1]["labels"].numpy()[-1:]])
    assert len(stream) == total
    ends = np.flatnonzero(stream == megatron_tokenizer.eod)
    assert len(ends) == len(texts)
    decoded = [megatron_tokenizer.detokenize(doc.tolist()) for doc in np.split(stream, ends + 1)[:-1]]
    # The stream follows GPTDataset's shuffled document order.
    assert decoded == [texts[d] for d in train.document_index]


def test_bad_line_names_its_line_and_writes_nothing(tmp_path, spm_model, capsys):
    lines = [json.dumps({"text": "good one"}), json.dumps({"text": "good two"}), "{not json", json.dumps({"txt": "x"}),
             json.dumps({"text": 7}), "", json.dumps({"text": "last"})]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "bad.jsonl line 3: invalid JSON" in error and "--skip-bad-lines" in error
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output, no staging directory

    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "out", "--skip-bad-lines") == 0
    assert "skipped 3 bad line(s)" in capsys.readouterr().out
    assert len(documents(str(tmp_path / "out_text_document"))) == 3  # the blank line is not a document


def test_a_lone_surrogate_is_a_bad_line(tmp_path, spm_model, megatron_tokenizer, capsys):
    """JSON's "\\ud800" without its pair is no Unicode text: a bad line named by number, skipped and counted with
    --skip-bad-lines (issue 19: sentencepiece's TypeError, naming no line, and not skipped). A pair is an emoji."""
    lines = ['{"text": "an emoji \\ud83d\\ude00 from a pair"}', '{"text": "a lone \\ud800 high half"}',
             '{"text": ["a list", "with a lone \\udc80 low half"]}', '{"text": "last"}']
    corpus = tmp_path / "surrogates.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "surrogates.jsonl line 2: 'text' holds a lone surrogate \\ud800" in error and "--skip-bad-lines" in error
    assert sorted(os.listdir(tmp_path)) == ["surrogates.jsonl"]

    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "out", "--skip-bad-lines",
               "--append-eod") == 0
    assert "skipped 2 bad line(s)" in capsys.readouterr().out
    assert documents(str(tmp_path / "out_text_document")) == reference_documents(
        megatron_tokenizer, ["an emoji \U0001f600 from a pair", "last"], append_eod=True)


def test_missing_key_and_non_string_messages(tmp_path, spm_model, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"body": "no text key"}])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "o") == 1
    assert "c.jsonl line 2: no key 'text' (has 'body'; choose with --json-keys)" in capsys.readouterr().err
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"text": ["ok", 3]}])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "o") == 1
    assert "'text' is a list, not a string or a list of strings" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, spm_model, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "first version"}])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "o") == 0
    before = (tmp_path / "o_text_document.bin").read_bytes()
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a second, different version"}])
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "o") == 1
    assert "pass --force" in capsys.readouterr().err
    assert (tmp_path / "o_text_document.bin").read_bytes() == before
    assert run(spm_model, "--input", corpus, "--output-prefix", tmp_path / "o", "--force") == 0
    assert (tmp_path / "o_text_document.bin").read_bytes() != before


def test_usage_errors(tmp_path, spm_model, capsys):
    assert run(spm_model, "--input", tmp_path / "missing.jsonl", "--output-prefix", tmp_path / "o") == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["--input", "x", "--output-prefix", str(tmp_path / "o")]) == 2  # a flag to add: bad usage
    assert "--tokenizer-type is required" in capsys.readouterr().err
    assert main(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "nope.model"),
                 "--input", "x", "--output-prefix", str(tmp_path / "o")]) == 1
    assert os.listdir(tmp_path) == []


def test_command_line_tool(tmp_path, spm_model):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}, {"text": "second document"}])
    command = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
               "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "Llama2Tokenizer",
               "--tokenizer-model", spm_model, "--append-eod", "--workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "2 documents" in done.stdout
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and "exists" in done.stderr


def test_a_key_without_text_is_refused_and_nothing_written(tmp_path, spm_model, capsys):
    """One of several --json-keys empty in every document: its dataset would hold no token (issue 15, item 4)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a body", "title": ""}, {"text": "another", "title": ""}])
    assert run(spm_model, "--input", corpus, "--json-keys", "text", "title", "--output-prefix", tmp_path / "o") == 1
    assert "'title' is empty text in all 2 document(s). Nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
