"""The real Llama-2 tokenizer (rebuilt from llama.cpp's Llama SPM vocabulary, tests/llama2_spm.py): it reproduces
llama.cpp's own expectations, and ``preprocess_data`` with it writes Megatron-LM's token stream."""

import json

import numpy as np
import pytest
from llama2_spm import FETCH_HINT, build_llama2_tokenizer_model, sdist_path
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_harpe.data.cli import preprocess_data
from megatron_harpe.data.synthetic import FillerText
from megatron_harpe.data.tokenizer import build_tokenizer, tokenizer_namespace

pytestmark = pytest.mark.skipif(not sdist_path().is_file(), reason=f"no {sdist_path()}: {FETCH_HINT}")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    return build_llama2_tokenizer_model(tmp_path_factory.mktemp("llama2"))


def test_rebuilt_model_reproduces_llama_cpp_expectations(llama2):
    import sentencepiece as spm

    model, cases = llama2
    assert len(cases) == 46  # the sdist's .inp/.out pairs: whitespace runs, scripts, emoji, code, digits
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert (processor.vocab_size(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (32000, 0, 1, 2)
    assert processor.encode("Hello world") == [15043, 3186]  # Llama-2's well-known ids
    assert [text for text, ids in cases if processor.encode(text) != ids] == []


def test_preprocess_with_llama2_equals_megatron_lm(tmp_path, llama2, tricky_texts):
    model, cases = llama2
    texts = [text for text, _ in cases] + tricky_texts + [FillerText(seed=s).document(400) for s in range(4)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    argv = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(model), "--input", str(corpus),
            "--output-prefix", str(tmp_path / "out"), "--append-eod", "--workers", "0"]
    assert preprocess_data(argv) == 0
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    got = [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]
    megatron = build_tokenizer(tokenizer_namespace("Llama2Tokenizer", str(model)))
    # Megatron-LM's preprocess_data.py: one sequence per document, its ids then EOD; empty documents are dropped.
    want = [ids + [megatron.eod] for ids in map(megatron.tokenize, texts) if ids]
    assert got == want


def test_word_cache_is_exact_for_llama2_on_fuzzed_text(llama2, space_mark_texts):
    """Llama-2's model takes the word-cache path (checked from its file), and there encodes as sentencepiece does on
    strings where a literal "▁" meets spaces, tabs and newlines (issue 19)."""
    import sentencepiece as spm

    from megatron_harpe.data.tokenizer import WordCacheEncoder, word_cache_exactness

    model, _ = llama2
    assert word_cache_exactness(str(model))[0]
    processor = spm.SentencePieceProcessor(model_file=str(model))
    texts = space_mark_texts
    differ = [t for t, ids, want in zip(texts, WordCacheEncoder(processor).encode(texts), processor.encode(texts))
              if ids != want]
    assert not differ, f"{len(differ)} of {len(texts)} differ from sentencepiece, e.g. {differ[:3]}"
