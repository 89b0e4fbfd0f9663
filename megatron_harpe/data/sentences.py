"""Sentence splitting with nltk's punkt, offline.

Megatron-LM's ``--split-sentences`` calls ``nltk.download("punkt")``, which fails without internet. Here the installed
``punkt_tab`` model for the language is used when nltk finds one (``NLTK_DATA`` is honoured); otherwise punkt is
trained on the input itself (unsupervised, as punkt was designed to be), which learns the corpus's abbreviations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer, PunktTrainer

log = logging.getLogger(__name__)

# Megatron-LM splits a text in windows of this many characters (bounding punkt's memory); the windows are part of
# its token stream, so they are kept.
SPLIT_WINDOW = 1_000_000


try:
    from nltk import redos
except ImportError:  # nltk < 3.10 puts no time limit on its matches
    redos = None


class UntimedLanguageVars(PunktLanguageVars):
    """punkt's language variables with its own two patterns run without nltk's 5 s limit.

    nltk >= 3.10 times every match against ReDoS, and a ``finditer`` over a text counts as one match: on a busy
    machine 5 s for a whole 1M-character window is exceeded and a correct split raises ``TimeoutError``. These are
    punkt's own patterns (not a user's), so they run as they did before nltk 3.10.
    """

    def _untimed(self, name: str, rx):
        if redos is None:
            return rx
        cache = self.__dict__.setdefault("_untimed_patterns", {})
        if name not in cache:
            cache[name] = redos.compile(rx, timeout=None)
        return cache[name]

    def period_context_re(self):
        return self._untimed("period_context", super().period_context_re())

    def _word_tokenizer_re(self):
        return self._untimed("word_tokenizer", super()._word_tokenizer_re())


class NewlineKeepingLanguageVars(UntimedLanguageVars):
    r"""punkt boundaries that leave the whitespace after a sentence in that sentence (``--keep-newlines``).

    Megatron-LM's ``CustomLanguageVars`` pattern (its tools/preprocess_data.py), anchored at a word start. Megatron's
    own tries ``\S*`` from every position of a word, quadratic in the word's length (nltk's 5 s limit raises on a
    100k-character word). Its matches start at word starts anyway (a match from inside a word is also one from the
    word's start, and once a match ends inside a word the rest of that word holds none), so the anchor keeps its
    sentences and makes the scan linear. Without the ``\S*`` (nltk's own pattern) runs like "!!!!!!" split differently.
    """

    _period_context_fmt = r"""
        (?<!\S)                      # a word start (Megatron-LM's pattern has no anchor)
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it stays with this sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next token
        ))"""


def installed_punkt_parameters(lang: str = "english"):
    """nltk's installed punkt parameters for ``lang``, or None when nltk has none (no download is attempted)."""
    from nltk.tokenize.punkt import PunktTokenizer

    try:
        return PunktTokenizer(lang)._params
    except (LookupError, ValueError, OSError):
        return None


def train_punkt_parameters(texts: Iterable[str]) -> PunktParameters:
    """Unsupervised punkt parameters (abbreviations, collocations, sentence starters) learned from ``texts``."""
    trainer = PunktTrainer()
    for text in texts:
        trainer.train(text, finalize=False)
    trainer.finalize_training()
    return trainer.get_params()


def punkt_parameters(lang: str, training_texts: Iterable[str]) -> tuple[PunktParameters, str]:
    """Installed parameters for ``lang`` if nltk has them, else trained on ``training_texts``; and where they came from."""
    params = installed_punkt_parameters(lang)
    if params is not None:
        return params, f"nltk punkt_tab '{lang}'"
    log.info("nltk has no punkt model for %r installed (and none is downloaded): training punkt on the input", lang)
    return train_punkt_parameters(training_texts), "punkt trained on the input (no nltk punkt data installed)"


class SentenceSplitter:
    """``split(text) -> sentences`` with punkt, in Megatron-LM's 1M-character windows."""

    def __init__(self, params: PunktParameters, keep_newlines: bool = False):
        lang_vars = NewlineKeepingLanguageVars() if keep_newlines else UntimedLanguageVars()
        self.punkt = PunktSentenceTokenizer(params, lang_vars=lang_vars)

    def split(self, text: str) -> list[str]:
        return [sentence for start in range(0, len(text), SPLIT_WINDOW)
                for sentence in self.punkt.tokenize(text[start:start + SPLIT_WINDOW])]
