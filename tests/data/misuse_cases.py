"""Misuse rows for the data commands (tools/preprocess_data.py, tools/build_long_context_mix.py,
examples/prepare_long_context_data.sh)."""

from misuse import Misuse

PREPROCESS = "megatron_harpe.data.cli:preprocess_data"
MIX = "megatron_harpe.data.cli:build_long_context_mix"


def _tokenizer(tmp):
    """A small sentencepiece model trained on the spot (about a second)."""
    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    return train_sentencepiece([FillerText(0).document(2000)], str(tmp / "spm" / "tiny"), vocab_size=500)


def corpus(text):
    def setup(tmp, _):
        (tmp / "c.jsonl").write_text(text)
        return {"spm": _tokenizer(tmp)}
    return setup


def text_as_tokenizer(tmp, _):
    (tmp / "c.jsonl").write_text('{"text": "a document"}\n')
    (tmp / "tokenizer.model").write_text("a text file where Llama-2's tokenizer.model should be\n")
    return {}


def readme_only_sources(tmp, _):
    (tmp / "sources").mkdir()
    (tmp / "sources" / "README.md").write_text("# where these corpora came from\n")
    (tmp / "tokenizer.model").write_text("unused: the script stops before tokenizing\n")
    return {}


def _preprocess(tokenizer_type, model="{tmp}/tokenizer.model"):
    return ["--input", "{tmp}/c.jsonl", "--output-prefix", "{tmp}/out", "--tokenizer-type", tokenizer_type,
            "--tokenizer-model", model]


CASES = [
    # 4: an input without a token is refused (a 0-document dataset trains on nothing).
    Misuse("4", "preprocess-refuses-an-empty-input", _preprocess("SentencePieceTokenizer", "{spm}"),
           message=r"--input .*c\.jsonl: no documents \(the input is empty or only blank lines\)\. Nothing was "
                   r"written", entry=PREPROCESS, exit_code=1, setup=corpus("")),
    Misuse("4", "preprocess-refuses-blank-lines-only", _preprocess("SentencePieceTokenizer", "{spm}"),
           message=r"no documents \(the input is empty or only blank lines\)", entry=PREPROCESS, exit_code=1,
           setup=corpus("\n\n  \n")),
    Misuse("4", "preprocess-refuses-only-empty-texts", _preprocess("SentencePieceTokenizer", "{spm}"),
           message=r"'text' is empty text in all 3 document\(s\)\. Nothing was written: check the input and "
                   r"--json-keys", entry=PREPROCESS, exit_code=1,
           setup=corpus('{"text": ""}\n{"text": ""}\n{"text": ""}\n')),
    # 5: weights change only what they name, and name a source that is there.
    Misuse("5", "mix-weight-for-an-absent-source",
           ["--source", "book={tmp}/book", "--source", "c4={tmp}/c4", "--weight", "arxiv=0.1", "--output-prefix",
            "{tmp}/mix"],
           message=r"--weight arxiv=\.\.\.: no --source arxiv; the sources given are book, c4", entry=MIX,
           exit_code=2),
    Misuse("5", "mix-weight-given-twice", ["--source", "book={tmp}/book", "--weight", "book=0.1", "--weight",
                                           "books=0.2", "--output-prefix", "{tmp}/mix"],
           message=r"--weight: book and books both name source book: give it once", entry=MIX, exit_code=2),
    Misuse("5", "mix-weight-not-a-number", ["--source", "book={tmp}/book", "--weight", "book=lots",
                                            "--output-prefix", "{tmp}/mix"],
           message=r"--weight: book='lots' is not a number", entry=MIX, exit_code=2),
    Misuse("5", "mix-source-given-twice", ["--source", "book={tmp}/a", "--source", "book={tmp}/b",
                                           "--output-prefix", "{tmp}/mix"],
           message=r"--source book is given twice: give each source once", entry=MIX, exit_code=2),
    Misuse("5", "mix-abbreviation-refused", ["--source", "book={tmp}/book", "--output", "{tmp}/mix"],
           message=r"unrecognized arguments: --output|required: --output-prefix", entry=MIX, exit_code=2),
    Misuse("5", "prepare-data-readme-is-not-a-source",
           ["env", "SOURCES_DIR={tmp}/sources", "TOKENIZER_MODEL={tmp}/tokenizer.model", "bash",
            "{root}/examples/prepare_long_context_data.sh", "{tmp}/out"],
           message=r"warning: not a source, left out: README\.md .*\n.*error: .*sources holds no source",
           exit_code=2, setup=readme_only_sources),
    # 6: a tokenizer file that is not a sentencepiece model: one line naming it.
    Misuse("6", "preprocess-names-a-bad-tokenizer-model", _preprocess("SentencePieceTokenizer"),
           message=r"tokenizer\.model: not a sentencepiece model \(.*\): give a sentencepiece model file",
           entry=PREPROCESS, exit_code=1, setup=text_as_tokenizer),
    # 6 (issue 19): a JSON escape that decodes to a lone surrogate is a bad line, not sentencepiece's TypeError.
    Misuse("6", "preprocess-names-a-lone-surrogate-line", _preprocess("SentencePieceTokenizer", "{spm}"),
           message=r"c\.jsonl line 2: 'text' holds a lone surrogate \\ud800 .*\. Nothing was written: fix the line, "
                   r"or pass --skip-bad-lines", entry=PREPROCESS, exit_code=1,
           setup=corpus('{"text": "good"}\n{"text": "bad \\ud800 here"}\n{"text": "also good"}\n')),
    Misuse("6", "preprocess-names-a-bad-llama2-tokenizer-model", _preprocess("Llama2Tokenizer"),
           message=r"tokenizer\.model: not a sentencepiece model", entry=PREPROCESS, exit_code=1,
           setup=text_as_tokenizer),
]
