import os
import random

import nltk
import pytest
from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer, save_punkt_params

from megatron_harpe.data.sentences import (
    SPLIT_WINDOW,
    SentenceSplitter,
    installed_punkt_parameters,
    punkt_parameters,
    train_punkt_parameters,
)
from megatron_harpe.data.synthetic import FillerText

TEXT = "Dr. Smith went to the market. He bought bread! Did he? Yes. We met Prof. Novak, e.g. at noon."
SENTENCES = ["Dr. Smith went to the market.", "He bought bread!", "Did he?", "Yes.", "We met Prof. Novak, e.g. at noon."]


@pytest.fixture
def nltk_data(tmp_path, monkeypatch):
    """An nltk data path with nothing installed (this machine's real one may or may not have punkt)."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def trained():
    return train_punkt_parameters(FillerText(seed=s).document(3000) for s in range(4))


def test_offline_training_learns_the_corpus_abbreviations(nltk_data, trained):
    assert installed_punkt_parameters("english") is None
    params, source = punkt_parameters("english", (FillerText(seed=s).document(3000) for s in range(4)))
    assert "trained on the input" in source
    assert {"dr", "prof", "e.g", "mrs"} <= params.abbrev_types
    assert SentenceSplitter(params).split(TEXT) == SENTENCES
    # Untrained punkt breaks at every abbreviation: training is what makes the split right.
    from nltk.tokenize.punkt import PunktParameters

    assert len(SentenceSplitter(PunktParameters()).split(TEXT)) > len(SENTENCES)


def test_installed_punkt_tab_is_preferred(nltk_data, trained):
    target = nltk_data / "tokenizers" / "punkt_tab" / "english"
    os.makedirs(target.parent)
    save_punkt_params(trained, dir=str(target))
    params, source = punkt_parameters("english", iter(()))  # nothing to train on: it must not need to
    assert source == "nltk punkt_tab 'english'"
    assert params.abbrev_types == trained.abbrev_types


def test_keep_newlines_keeps_the_whitespace_after_each_sentence(trained):
    text = "First one.\nSecond one.  Third\n\nfourth ends."
    kept = SentenceSplitter(trained, keep_newlines=True).split(text)
    assert "".join(kept) == text
    assert kept[0] == "First one.\n"
    assert SentenceSplitter(trained).split(text)[0] == "First one."


def test_split_works_in_megatron_windows(trained):
    sentence = "Some words here. "
    text = sentence * (SPLIT_WINDOW // len(sentence) + 10)
    sentences = SentenceSplitter(trained).split(text)
    # The window edge cuts one sentence in two, exactly as Megatron-LM's splitter does.
    assert len(sentences) == text.count(".") + 1
    assert "".join(sentences).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_punkt_window_patterns_run_without_nltks_match_time_limit(trained, monkeypatch, keep_newlines):
    """nltk >= 3.10 times a whole finditer over a window (5 s): a correct split of 1M characters raised on a busy
    machine. The two patterns that scan a whole window run untimed (plain punkt's fail once the limit is shrunk to
    nothing) and give the same matches, so the sentences are punkt's."""
    redos = pytest.importorskip("nltk.redos")
    from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

    from megatron_harpe.data.sentences import NewlineKeepingLanguageVars, UntimedLanguageVars

    text = FillerText(seed=9).document(400)
    ours, plain = (NewlineKeepingLanguageVars() if keep_newlines else UntimedLanguageVars()), PunktLanguageVars()
    spans = [m.span() for m in ours.period_context_re().finditer(text)]
    words = ours.word_tokenize(text)
    assert words == plain.word_tokenize(text) and len(spans) > 5
    if not keep_newlines:
        assert spans == [m.span() for m in plain.period_context_re().finditer(text)]
        assert SentenceSplitter(trained).split(text) == PunktSentenceTokenizer(trained).tokenize(text)
    monkeypatch.setattr(redos, "DEFAULT_TIMEOUT", 1e-9)
    with pytest.raises(TimeoutError):
        list(plain.period_context_re().finditer(text))
    with pytest.raises(TimeoutError):
        plain.word_tokenize(text)
    assert [m.span() for m in ours.period_context_re().finditer(text)] == spans
    assert ours.word_tokenize(text) == words


class MegatronLMCustomLanguageVars(PunktLanguageVars):
    """The reference: Megatron-LM's ``--keep-newlines`` pattern, quoted from its tools/preprocess_data.py
    (``CustomLanguageVars``; the class is not in the megatron-core wheel)."""

    _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


def _sentence_ending_texts(n, seed):
    """Short random texts full of runs of sentence-ending characters, quotes, brackets and abbreviations."""
    rng = random.Random(seed)
    alphabet = list("!!!???...ab A\n \t\"')") + ["Dr.", "e.g.", " The", "\n\n", "!!!!!!", "?!"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_keep_newlines_equals_megatron_lm(trained):
    """Megatron-LM splits "Wow!!!!!! Next" where the ending run's word starts (issue 19: the pattern without its
    leading word material split such runs differently)."""
    megatron = PunktSentenceTokenizer(trained, lang_vars=MegatronLMCustomLanguageVars())
    ours = SentenceSplitter(trained, keep_newlines=True)
    texts = [TEXT, "First one.\nSecond one.  Third\n\nfourth ends.", FillerText(seed=5).document(300),
             "Wow!!!!!! Next one?! And... then \"quoted.\" (Bracketed.) end"] + _sentence_ending_texts(3000, seed=0)
    differ = [text for text in texts if ours.split(text) != megatron.tokenize(text)]
    assert not differ, f"{len(differ)} of {len(texts)} split differently from Megatron-LM, e.g. {differ[:3]}"


@pytest.mark.parametrize("word", ["a" * 100_000, "!" * 100_000, "a." * 50_000])
def test_keep_newlines_splits_a_100k_character_word(trained, word):
    """Megatron-LM's own pattern is quadratic in a word's length (nltk's 5 s limit raises on the first word); the
    anchored one is linear, so these finish, and every character stays in some sentence."""
    text = f"Before it. {word} after it. Tail"
    sentences = SentenceSplitter(trained, keep_newlines=True).split(text)
    assert "".join(sentences) == text
    assert sentences[0] == "Before it. " and sentences[-1] == "Tail"
