import random

import pytest
import sentencepiece

from megatron_harpe.data.synthetic import FillerText
from megatron_harpe.data.tokenizer import (
    WordCacheEncoder,
    build_tokenizer,
    text_encoder,
    tokenizer_namespace,
    train_sentencepiece,
    word_cache_exactness,
)


def _fuzz_texts(n=300, seed=0):
    """Random strings over an alphabet heavy in spaces, punctuation, digits and multi-byte characters."""
    rng = random.Random(seed)
    alphabet = list("abcdefghij xyz  .,;!?0123456789\t\n") + ["  ", "   ", "\u2581", "é", "日", "🙂", "Dr.", "the "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_word_cache_equals_megatron_tokenize(spm_model, megatron_tokenizer, corpus_texts):
    exact, why = word_cache_exactness(spm_model)
    assert exact, why
    texts = corpus_texts + _fuzz_texts()
    encoder = WordCacheEncoder(sentencepiece.SentencePieceProcessor(model_file=spm_model))
    assert encoder.encode(texts) == [megatron_tokenizer.tokenize(t) for t in texts]
    # Second pass is served from the cache (and still equal).
    assert len(encoder.cache) > 100
    assert encoder.encode(texts[::-1]) == [megatron_tokenizer.tokenize(t) for t in texts[::-1]]


def test_word_cache_equals_sentencepiece_where_a_literal_space_mark_meets_spaces(spm_model, space_mark_texts):
    """sentencepiece escapes a space as U+2581, so a literal one is a space to it: "x▁ 4" is "▁x▁▁4", where "▁▁" is one
    piece. Splitting at that space encoded "x▁" and "4" apart (issue 19: 7,322 of 200,000 strings of this kind
    differed with Llama-2's model, 0 since)."""
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    assert {"\u2581\u2581", "\u2581" * 4} <= {processor.id_to_piece(i) for i in range(processor.vocab_size())}
    assert WordCacheEncoder(processor).encode_one("x\u2581 4") == processor.encode("x\u2581 4")
    texts = space_mark_texts
    got = WordCacheEncoder(processor).encode(texts)
    differ = [text for text, ids, want in zip(texts, got, processor.encode(texts)) if ids != want]
    assert not differ, f"{len(differ)} of {len(texts)} differ from sentencepiece, e.g. {differ[:3]}"


def test_word_cache_bound_clears_and_stays_exact(spm_model, megatron_tokenizer):
    encoder = WordCacheEncoder(sentencepiece.SentencePieceProcessor(model_file=spm_model), max_words=50)
    texts = [FillerText(seed=s).paragraph() for s in range(20)]
    largest = 0
    for text in texts:  # the bound is checked before each batch: cache <= bound + one batch's new words
        assert encoder.encode([text]) == [megatron_tokenizer.tokenize(text)]
        largest = max(largest, len(encoder.cache))
        assert len(encoder.cache) <= 50 + len(set(WordCacheEncoder.words(text)))
    assert largest > 50  # it did fill up and clear


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"])
def test_text_encoder_uses_the_word_cache_for_plain_sentencepiece(spm_model, tokenizer_type, tricky_texts):
    tokenizer = build_tokenizer(tokenizer_namespace(tokenizer_type, spm_model))
    encode, name = text_encoder(tokenizer, spm_model)
    assert name == "sentencepiece, word cache"
    assert encode(tricky_texts) == [tokenizer.tokenize(t) for t in tricky_texts]


def test_text_encoder_falls_back_where_megatron_post_processes(spm_model, tricky_texts):
    # Legacy mode splits around special-token strings in Python: the encoder must call megatron's tokenize.
    tokenizer = build_tokenizer(tokenizer_namespace("SentencePieceTokenizer", spm_model,
                                                    tokenizer_sentencepiece_legacy=True, special_tokens=["<EOD>"]))
    encode, name = text_encoder(tokenizer, spm_model)
    assert "tokenize" in name
    assert encode(tricky_texts) == [tokenizer.tokenize(t) for t in tricky_texts]


@pytest.fixture(scope="module")
def spanning_model(tmp_path_factory, corpus_texts):
    """A model whose pieces cross word boundaries: encoding word by word would be wrong for it."""
    texts = corpus_texts + [FillerText(seed=s).document(3000) for s in range(3)]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "spanning"), vocab_size=1000,
                               split_by_whitespace=False)


def test_exactness_check_refuses_pieces_across_words(spanning_model):
    exact, why = word_cache_exactness(spanning_model)
    assert not exact and "span a word boundary" in why
    processor = sentencepiece.SentencePieceProcessor(model_file=spanning_model)
    texts = [FillerText(seed=1).paragraph() for _ in range(5)]
    # The check matters: word-by-word encoding really differs for this model.
    assert WordCacheEncoder(processor).encode(texts) != processor.encode(texts)
    tokenizer = build_tokenizer(tokenizer_namespace("SentencePieceTokenizer", spanning_model))
    encode, name = text_encoder(tokenizer, spanning_model)
    assert name.startswith("sentencepiece, batched")
    assert encode(texts) == [tokenizer.tokenize(t) for t in texts]


def test_exactness_check_refuses_nfkc_normalization(tmp_path, corpus_texts):
    model = train_sentencepiece(corpus_texts * 3, str(tmp_path / "nfkc"), vocab_size=400,
                                normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)
    exact, why = word_cache_exactness(model)
    assert not exact and "normalization" in why


def test_tiny_model_round_trips_any_text(spm_model, tricky_texts):
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    assert processor.vocab_size() == 1000
    for text in tricky_texts + _fuzz_texts(50, seed=1):
        # sentencepiece writes spaces as U+2581, so a literal U+2581 comes back as a space (Llama-2's does the same).
        assert processor.decode(processor.encode(text)) == text.replace("\u2581", " ")


def test_train_sentencepiece_refuses_no_text(tmp_path):
    with pytest.raises(RuntimeError):
        train_sentencepiece([], str(tmp_path / "empty"), vocab_size=100)


def test_tokenizer_flags_equal_megatrons():
    """preprocess_data.py declares Megatron-LM's tokenizer flags itself (so --help imports no megatron): the same
    options, destinations, defaults, types, choices and actions as megatron.training.arguments'."""
    import argparse

    from megatron.training.arguments import _add_tokenizer_args

    from megatron_harpe.data.tokenizer import add_megatron_tokenizer_args

    def flags(parser):
        return {tuple(a.option_strings): (a.dest, a.default, a.type, tuple(a.choices or ()), a.nargs, type(a))
                for a in parser._actions if a.dest != "help"}

    ours, theirs = flags(add_megatron_tokenizer_args(argparse.ArgumentParser())), \
        flags(_add_tokenizer_args(argparse.ArgumentParser()))
    assert ours == theirs


def test_a_text_file_is_not_a_sentencepiece_model(tmp_path):
    from megatron_harpe.data.tokenizer import TokenizerError

    (tmp_path / "tokenizer.model").write_text("not a model\n")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a sentencepiece model"):
        build_tokenizer(tokenizer_namespace("SentencePieceTokenizer", str(tmp_path / "tokenizer.model")))
