import random

import pytest

from megatron_harpe.data.synthetic import FillerText, source_documents
from megatron_harpe.data.tokenizer import build_tokenizer, tokenizer_namespace, train_sentencepiece

# Text a tokenizer round trip can get wrong: runs of spaces, leading/trailing whitespace, tabs and newlines, a literal
# sentencepiece space mark, non-Latin scripts and emoji (byte fallback), digits, special-token look-alikes, nothing.
TRICKY_TEXTS = [
    "  two leading spaces, two  inner, three   and trailing  ",
    "tab\tseparated\tcolumns\nand a second line\n\n\nafter blank lines",
    "a literal \u2581 space mark and \u2581\u2581 two",
    "Ünïcödé façade — naïve café; 日本語のテキスト; Ελληνικά; emoji 🙂🚀 done.",
    "digits 3.14159 and 1,000,000 and 2024-12-09",
    "<s> looks special </s> but is text <EOD>",
    " ",
    "",
    "x",
]


# Where a literal sentencepiece space mark meets real spaces, tabs and newlines (issue 19), with byte-fallback text.
SPACE_MARK_ALPHABET = list("ab x1 \t\n\u2581é日🙂") + ["\u2581\u2581", "  ", "    ", "the", "9"]


@pytest.fixture(scope="session")
def space_mark_texts():
    """"x▁ 4" (issue 19's example) and 4,000 random strings of up to 16 symbols of ``SPACE_MARK_ALPHABET``."""
    rng = random.Random(0)
    fuzzed = ["".join(rng.choice(SPACE_MARK_ALPHABET) for _ in range(rng.randint(0, 16))) for _ in range(4000)]
    return ["x\u2581 4"] + fuzzed


@pytest.fixture(scope="session")
def tricky_texts():
    return list(TRICKY_TEXTS)


@pytest.fixture(scope="session")
def corpus_texts():
    """Filler documents of many lengths (a few words to a few thousand) plus the tricky texts."""
    filler = FillerText(seed=7)
    texts = [filler.document(n) for n in (3, 12, 40, 150, 600, 2500, 90, 7, 1200, 333)]
    texts += [record["text"] for record in source_documents("stackexchange", 20, seed=3, length_scale=0.3)]
    return texts + TRICKY_TEXTS


def indented_text(lines: int = 600, seed: int = 11) -> str:
    """Sentences indented by 0-8 spaces, as in code: what teaches a model Llama-2's whitespace-only pieces ("▁▁")."""
    filler = FillerText(seed=seed)
    return "\n".join(" " * (2 * (i % 5)) + filler.sentence() for i in range(lines))


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts):
    """A 1000-piece Llama-2-like sentencepiece BPE model trained at test time (about a second), with whitespace-only
    pieces ("▁▁", "▁▁▁▁") as Llama-2 has: they merge a literal "▁" with the space after it."""
    extra = [FillerText(seed=s).document(3000) for s in range(3)] + [indented_text()]
    return train_sentencepiece(corpus_texts + extra, str(tmp_path_factory.mktemp("spm") / "tiny"), vocab_size=1000)


@pytest.fixture(scope="session")
def megatron_tokenizer(spm_model):
    return build_tokenizer(tokenizer_namespace("SentencePieceTokenizer", spm_model))
