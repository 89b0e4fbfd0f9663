import numpy as np
import pytest
import sentencepiece

from megatron_harpe.data.synthetic import (
    CLASSIC_NEEDLE,
    FillerText,
    needle_sample,
    passkey_sample,
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
