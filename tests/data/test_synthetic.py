import json
import re

import numpy as np
import pytest
import sentencepiece

from megatron_harpe.data.synthetic import (
    CLASSIC_ANSWER,
    CLASSIC_NEEDLE,
    CLASSIC_QUESTION,
    PASSKEY_TASK,
    FillerText,
    RetrievalPart,
    WordCodec,
    classic_needle,
    needle_sample,
    passkey_sample,
    retrieval_documents,
    retrieval_kinds,
    source_documents,
)


@pytest.fixture(scope="module")
def processor(spm_model):
    return sentencepiece.SentencePieceProcessor(model_file=spm_model)


def test_filler_is_seeded_and_shaped_like_prose():
    assert FillerText(3).document(500) == FillerText(3).document(500)
    assert FillerText(3).document(500) != FillerText(4).document(500)
    doc = FillerText(0).document(2000)
    assert 2000 <= len(doc.split()) < 2200 and "\n\n" in doc
    assert any(a in doc for a in ("Dr. ", "Mr. ", "Prof. ", "e.g. "))  # what sentence splitters must get right


def test_source_length_distributions_differ():
    def median_words(source):
        return np.median([len(r["text"].split()) for r in source_documents(source, 40, length_scale=0.1)])

    assert median_words("book") > 10 * median_words("c4")
    records = list(source_documents("arxiv", 3, seed=1, max_words=50))
    assert [r["id"] for r in records] == ["arxiv-0", "arxiv-1", "arxiv-2"]
    assert all(len(r["text"].split()) < 80 for r in records)


@pytest.mark.parametrize("make", [
    lambda p, **kw: passkey_sample(p.encode, p.decode, passkey=90417, **kw),
    lambda p, **kw: needle_sample(p.encode, p.decode, style="classic", **kw),
    lambda p, **kw: needle_sample(p.encode, p.decode, style="ruler", seed=5, **kw),
    lambda p, **kw: needle_sample(p.encode, p.decode, style="lwm", seed=2, **kw),
], ids=["passkey", "niah-classic", "niah-ruler", "niah-lwm"])
def test_retrieval_samples_have_exact_length_and_depth(processor, make):
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        sample = make(processor, context_tokens=1500, depth=depth)
        assert len(sample.input_ids) == 1500
        text = processor.decode(sample.input_ids)
        assert text.count(sample.answer) == (2 if sample.kind == "passkey" else 1)  # "key is N ... N is the key"
        before = processor.decode(sample.input_ids[:sample.needle_position])
        # Inserted at a sentence boundary, at or just before the requested depth.
        assert before == "" or before.rstrip().endswith((".", "?", "!"))
        positions.append(sample.needle_position)
        assert processor.decode(sample.answer_ids) == sample.answer
    assert positions == sorted(positions) and positions[-1] - positions[0] > 1000


def test_ruler_needles_vary_with_the_seed(processor):
    a = needle_sample(processor.encode, processor.decode, context_tokens=600, depth=0.5, style="ruler", seed=1)
    b = needle_sample(processor.encode, processor.decode, context_tokens=600, depth=0.5, style="ruler", seed=2)
    assert a.answer != b.answer and len(a.answer) == 7 and a.answer.isdigit()
    classic = needle_sample(processor.encode, processor.decode, context_tokens=600, depth=0.5)
    assert CLASSIC_NEEDLE in processor.decode(classic.input_ids)


def test_bad_requests(processor):
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_sample(processor.encode, processor.decode, context_tokens=500, depth=1.5, passkey=1)
    with pytest.raises(ValueError, match="ask for a longer context"):
        passkey_sample(processor.encode, processor.decode, context_tokens=20, depth=0.5, passkey=1)
    with pytest.raises(ValueError, match="unknown needle style"):
        needle_sample(processor.encode, processor.decode, context_tokens=500, depth=0.5, style="other")


def test_make_synthetic_corpus_command(tmp_path, capsys):
    from megatron_harpe.data.cli import make_synthetic_corpus as main

    out = tmp_path / "corpus"
    assert main(["--out", str(out), "--docs-per-source", "5", "--length-scale", "0.05", "--vocab-size", "400"]) == 0
    sources = sorted(p.name for p in (out / "sources").iterdir())
    assert sources == sorted(f"{s}.jsonl" for s in ("commoncrawl", "c4", "github", "wikipedia", "book", "arxiv",
                                                     "stackexchange"))
    assert sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size() == 400
    before = (out / "sources" / "book.jsonl").read_bytes()
    assert main(["--out", str(out), "--docs-per-source", "9"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (out / "sources" / "book.jsonl").read_bytes() == before


# --- retrieval-rich documents ----------------------------------------------------------------------------------

QUESTION_ENDS = {"passkey": "The pass key is", "niah-": "Answer:", "ruler-": "mentioned in the provided text are"}


def _question_end(kind):
    return next(end for prefix, end in QUESTION_ENDS.items() if kind.startswith(prefix))


@pytest.fixture(scope="module")
def retrieval_records(processor):
    """Every kind, at 600-720 tokens, some with filler after the answer."""
    return list(retrieval_documents(60, (600, 720), processor.encode, processor.decode, seed=11,
                                    task_share=(0.7, 1.0)))


def test_every_kind_is_mixed_in(retrieval_records):
    assert {r["kind"] for r in retrieval_records} == set(retrieval_kinds())
    assert [r["id"] for r in retrieval_records[:2]] == ["retrieval-0", "retrieval-1"]


def test_the_answer_follows_its_question(retrieval_records):
    for r in retrieval_records:
        text, q, a = r["text"], r["question_start"], r["answer_start"]
        question = text[q:a - 1]
        assert question.startswith("What") and question.endswith(_question_end(r["kind"])), question
        assert text[a - 1] == " " and text[a:].startswith(r["answer"] + ".")
        assert "What" not in text[q + 1:a]  # the question is the last one before the answer


def test_every_needle_value_stands_where_the_record_says(retrieval_records):
    for r in retrieval_records:
        assert ", ".join(n["value"] for n in r["needles"]) == r["answer"]
        for needle in r["needles"]:
            start = needle["start"]
            assert r["text"][start:start + len(needle["value"])] == needle["value"]
            assert start < r["question_start"]  # in the context, before the question
        if r["kind"] == "passkey":
            value = r["needles"][0]["value"]
            assert f"The pass key is {value}. Remember it. {value} is the pass key." in r["text"]
            assert r["text"].startswith(PASSKEY_TASK)
        elif r["kind"] == "niah-classic":
            assert f" is {r['answer']}." in r["text"] and "San Francisco" not in r["text"]
        elif r["kind"].startswith("ruler-"):
            noun = "uuids" if r["kind"] in ("ruler-single_3", "ruler-multikey_3") else "numbers"
            for needle in r["needles"]:
                assert r["text"][start - len(noun) - 100:start].count(f"One of the special magic {noun} for ") >= 1
        else:
            assert r["text"][r["needles"][0]["start"] - 4:r["needles"][0]["start"]] == "is: "


def test_prompts_are_the_evaluations_own(processor, retrieval_records):
    """A RULER record's prompt is token for token what eval_niah --suite ruler builds with that seed."""
    from megatron_harpe.eval.ruler import ruler_sample

    checked = 0
    for r in retrieval_records:
        if r["kind"].startswith("ruler-"):
            prompt = processor.encode(r["text"][:r["answer_start"] - 1])
            sample = ruler_sample(r["kind"][len("ruler-"):], processor.encode, processor.decode,
                                  context_tokens=len(prompt), seed=r["seed"])
            assert sample.input_ids == prompt and ", ".join(sample.answers) == r["answer"]
            checked += 1
        assert r["seed"] >= 2**32  # evaluation seeds lie below: no evaluation sample is a training document
    assert checked >= 20


def test_lengths_are_exact_tokens_within_the_range(processor, retrieval_records):
    lengths = [len(processor.encode(r["text"])) for r in retrieval_records]
    assert min(lengths) >= 600 and max(lengths) <= 720 and len(set(lengths)) > 20
    fixed = list(retrieval_documents(12, (256, 256), processor.encode, processor.decode, seed=3,
                                     kinds=["passkey", "niah-classic", "niah-ruler", "niah-lwm", "ruler-single_1"]))
    assert {len(processor.encode(r["text"])) for r in fixed} == {256}
    # Without a tokenizer, lengths are words.
    words = WordCodec()
    assert {len(r["text"].split()) for r in retrieval_documents(12, (200, 200), words.encode, words.decode)} == {200}


def test_task_share_leaves_filler_after_the_answer(processor, retrieval_records):
    tails = [len(processor.encode(r["text"][r["answer_start"]:])) - len(processor.encode(r["answer"] + "."))
             for r in retrieval_records]
    assert max(tails) > 100 and min(tails) < 20


def test_retrieval_documents_are_seeded(processor):
    def make(seed):
        return list(retrieval_documents(6, (600, 700), processor.encode, processor.decode, seed=seed))

    assert make(5) == make(5)
    assert [r["text"] for r in make(5)] != [r["text"] for r in make(6)]


def test_retrieval_bad_arguments(processor):
    def make(*args, **kwargs):
        return list(retrieval_documents(*args, processor.encode, processor.decode, **kwargs))

    with pytest.raises(ValueError, match="unknown retrieval kind 'ruler-single_9'"):
        make(1, (300, 300), kinds=["ruler-single_9"])
    with pytest.raises(ValueError, match="1 <= min <= max"):
        make(1, (300, 200))
    with pytest.raises(ValueError, match="0 < min <= max <= 1"):
        make(1, (300, 300), task_share=(0.0, 1.0))
    with pytest.raises(ValueError, match="a ruler-multivalue document of 60 tokens cannot be built .* make the "
                                         "documents longer or leave ruler-multivalue out"):
        make(1, (60, 60), kinds=["ruler-multivalue"])
    with pytest.raises(ValueError, match="part name 'a/b'"):
        RetrievalPart("a/b", 1, 10, 10)
    with pytest.raises(ValueError, match="2 <= min <= max tokens"):
        RetrievalPart("a", 1, 10, 5)


def test_classic_needle_defaults_are_kamradts():
    assert classic_needle() == (CLASSIC_NEEDLE, CLASSIC_QUESTION + " Answer:", CLASSIC_ANSWER)


def test_make_synthetic_corpus_retrieval_parts(tmp_path, capsys):
    """Two parts, one tokenizer; preprocessed, every document is exactly its part's length (text + EOD)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_harpe.data.cli import make_synthetic_corpus as main
    from megatron_harpe.data.cli import preprocess_data

    out = tmp_path / "corpus"
    assert main(["--out", str(out), "--retrieval", "stage0:8:200", "--retrieval", "stage1:3:700-800",
                 "--vocab-size", "600", "--retrieval-kinds", "passkey,niah-ruler,ruler-single_1"]) == 0
    assert "stage1: " + str(out / "parts" / "stage1.jsonl") in capsys.readouterr().out
    for name, lengths, docs in (("stage0", {200}, 8), ("stage1", range(700, 801), 3)):
        assert preprocess_data(["--input", str(out / "parts" / f"{name}.jsonl"), "--output-prefix",
                                str(tmp_path / name), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                str(out / "tokenizer.model"), "--append-eod", "--workers", "0"]) == 0
        dataset = IndexedDataset(str(tmp_path / f"{name}_text_document"))
        assert len(dataset) == docs and set(dataset.sequence_lengths.tolist()) <= set(lengths)
    kinds = {json.loads(line)["kind"] for line in open(out / "parts" / "stage0.jsonl")}
    assert kinds <= {"passkey", "niah-ruler", "ruler-single_1"}


@pytest.mark.parametrize("argv, message", [
    (["--retrieval", "stage0:8"], r"--retrieval stage0:8: expected NAME:DOCS:TOKENS or NAME:DOCS:MIN-MAX"),
    (["--retrieval", "stage0:x:256"], r"--retrieval stage0:x:256: invalid literal"),
    (["--retrieval", "stage0:0:256"], r"stage0: 0 documents: give at least 1"),
    (["--retrieval", "s:4:300-200"], r"lengths 300-200: give 2 <= min <= max tokens"),
    (["--retrieval", "s:4:256", "--retrieval", "s:2:512"], r"part names must differ"),
    (["--retrieval", "s:4:256", "--docs-per-source", "5"], r"--docs-per-source describe per-source corpora"),
    (["--retrieval", "s:4:256", "--retrieval-kinds", "passkey,nope"], r"unknown nope; choose from passkey, "),
    (["--retrieval", "s:4:256", "--task-share", "0-1"], r"--task-share 0-1: give a share in \(0, 1\]"),
    (["--task-share", "0.5"], r"--task-share only apply with --retrieval"),
    (["--retrieval", "s:2:40", "--retrieval-kinds", "ruler-multiquery"],
     r"s: a ruler-multiquery document of 39 tokens cannot be built .*: make the documents longer or leave "
     r"ruler-multiquery out"),
])
def test_make_synthetic_corpus_refuses_bad_retrieval_settings(tmp_path, capsys, argv, message):
    from megatron_harpe.data.cli import make_synthetic_corpus as main

    assert main(["--out", str(tmp_path / "corpus"), "--vocab-size", "400", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "corpus").exists()  # nothing written, not even a partial directory
