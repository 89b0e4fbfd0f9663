"""Tokenizers: megatron-core's own (built from Megatron-LM's flags), a fast exact sentencepiece path, a tiny test model.

``build_tokenizer`` goes through ``megatron.core.tokenizers.utils.build_tokenizer`` with the namespace Megatron-LM's
``tools/preprocess_data.py`` gives it, so ids (EOD included) are the ones Megatron training sees.

``WordCacheEncoder`` is where the preprocessing speed is. A sentencepiece model that splits by whitespace has no
piece spanning ``"x▁y"`` (a word character, a space, a word character), so the encoding of a text is the
concatenation of the encodings of its space-separated words (a literal "▁" is a space to sentencepiece, so no text
splits beside one): each distinct word is encoded once (in one batched C++ call) and looked up afterwards. Text is
Zipf-distributed, so most words are seen before: 2-3x sentencepiece's own speed per core, with ids identical to
``tokenize(text)``. It is used only where that identity holds, which it checks from the model file: identity
normalization, dummy prefix, spaces kept, and no vocabulary piece spanning a word boundary (Llama-2's tokenizer
qualifies). Anything else is tokenized text by text by megatron's tokenizer.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import chain

from megatron_harpe.command import RunError

LLAMA2_LIKE_SPM = dict(
    # Llama-2's tokenizer.model settings that matter for round trips: byte fallback (no <unk> for any
    # character), digits split, whitespace kept as is, <unk>=0 <s>=1 </s>=2, no padding id.
    model_type="bpe", byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", add_dummy_prefix=True, allow_whitespace_only_pieces=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
)


# Megatron-LM tokenizer types that read --tokenizer-model as a sentencepiece model.
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


class TokenizerError(RunError, ValueError):  # an input that cannot be read: exit 1
    """A tokenizer file that cannot be used; the message names it and says what to give instead."""


def load_sentencepiece(path: str):
    """``sentencepiece.SentencePieceProcessor`` of ``path``, or one error line naming the file (not a traceback)."""
    import sentencepiece

    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: no such file: give a sentencepiece model (Llama-2's tokenizer.model)")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e}): give a sentencepiece model file such as "
                             "Llama-2's tokenizer.model") from None


MEGATRON_TOKENIZER_TYPES = ("BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
                            "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                            "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")


def add_megatron_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's tokenizer flags (``megatron.training.arguments._add_tokenizer_args``), declared here so that
    ``--help`` needs no megatron import; ``tests/data/test_tokenizer.py`` keeps them equal to megatron's."""
    g = parser.add_argument_group(title="tokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="Size of vocab before EOD or padding.")
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="Vocabulary size of the model (padded to be divisible by tensor model parallel size).")
    g.add_argument("--no-pad-vocab-size", "--disable-pad-vocab-size", action="store_false", dest="pad_vocab_size",
                   help="Do not pad the vocab size when --padded-vocab-size is not given.")
    g.add_argument("--vocab-file", type=str, default=None, help="Path to the vocab file.")
    g.add_argument("--merge-file", type=str, default=None, help="Path to the BPE merge file.")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="Number of additional vocabulary tokens (T5).")
    g.add_argument("--tokenizer-type", type=str, default=None, choices=MEGATRON_TOKENIZER_TYPES,
                   help="What type of tokenizer to use.")
    g.add_argument("--tokenizer-model", type=str, default=None, help="Path to the tokenizer model.")
    g.add_argument("--tokenizer-metadata", type=str, default=None, dest="metadata_path",
                   help="Path to the tokenizer metadata file in json format.")
    g.add_argument("--tokenizer-special-tokens", type=str, nargs="+", default=None, dest="special_tokens",
                   help="List of special tokens.")
    g.add_argument("--tiktoken-pattern", type=str, default=None, choices=["v1", "v2"],
                   help="Which tiktoken pattern to use.")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="Number of special tokens in tiktoken tokenizer.")
    g.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                   help="SentencePiece tokenizer wrapper legacy behavior. Allows special tokens usage.")
    g.add_argument("--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
                   "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces", action="store_false",
                   dest="tokenizer_sentencepiece_ignore_extra_whitespaces",
                   help="Keep extra whitespaces in the input text while encoding.")
    g.add_argument("--tokenizer-hf-no-use-fast", action="store_true", help="Use the slow HuggingFace tokenizer.")
    g.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true",
                   help="Converting text to ids will not include special tokens for HuggingFace tokenizer.")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Allow a HuggingFaceTokenizer's PreTrainedTokenizer to execute remote code.")
    g.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                   help="EOD token id for NullTokenizer. Defaults to `vocab_size - 1`.")
    g.add_argument("--null-tokenizer-pad-id", type=int, default=-1,
                   help="Pad token id for NullTokenizer. Defaults to -1 (no pad token).")
    g.add_argument("--chat-template", type=str, default=None,
                   help="Custom chat template in jinja format for conversation formatting.")
    return parser


def tokenizer_namespace(tokenizer_type: str, tokenizer_model: str | None = None, **overrides) -> argparse.Namespace:
    """Megatron-LM's tokenizer flags at their defaults, plus what its preprocess_data.py sets by hand."""
    from megatron.training.arguments import _add_tokenizer_args

    args = with_preprocessing_defaults(_add_tokenizer_args(argparse.ArgumentParser()).parse_args([]))
    args.tokenizer_type, args.tokenizer_model = tokenizer_type, tokenizer_model
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def with_preprocessing_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The values Megatron-LM's preprocess_data.py sets by hand for ``build_tokenizer`` (no model parallelism)."""
    args.rank, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size = 1, 128, 1
    args.vocab_extra_ids = 0
    return args


def build_tokenizer(args: argparse.Namespace):
    """megatron-core's tokenizer for Megatron-LM tokenizer flags (``--tokenizer-type``, ``--tokenizer-model``...)."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as megatron_build_tokenizer

    model = getattr(args, "tokenizer_model", None)
    if model is not None and not os.path.exists(model):
        raise FileNotFoundError(f"--tokenizer-model {model} does not exist: give the tokenizer model file "
                                "(Llama-2's tokenizer.model)")
    if model is not None and args.tokenizer_type in SENTENCEPIECE_TYPES:
        load_sentencepiece(model)  # megatron's loader would fail deep inside sentencepiece, with a traceback
    return megatron_build_tokenizer(args)


def sentencepiece_processor(tokenizer):
    """The sentencepiece processor behind a megatron tokenizer when ``tokenize(text) == processor.encode(text)``."""
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

    inner = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(inner, SentencePieceTokenizer) or inner.legacy:
        return None  # legacy mode splits around special-token strings in Python
    if inner.removed_extra_spaces and not inner.ignore_extra_whitespaces:
        return None  # megatron re-inserts extra spaces around the model
    return inner.tokenizer


def text_encoder(tokenizer, tokenizer_model: str | None) -> tuple[Callable[[Sequence[str]], list[list[int]]], str]:
    """The fastest ``texts -> [tokenizer.tokenize(t) for t in texts]`` that is exact for this tokenizer, and its name."""
    processor = sentencepiece_processor(tokenizer)
    if processor is not None:
        exact, why = word_cache_exactness(tokenizer_model)
        if exact:
            return WordCacheEncoder(processor).encode, "sentencepiece, word cache"
        return (lambda texts: processor.encode(list(texts))), f"sentencepiece, batched (no word cache: {why})"
    return (lambda texts: [tokenizer.tokenize(text) for text in texts]), f"{type(tokenizer).__name__}.tokenize"


def word_cache_exactness(model_path: str) -> tuple[bool, str]:
    """Whether word-by-word encoding equals whole-text encoding for this sentencepiece model, and why not."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.precompiled_charsmap or spec.normalization_rule_tsv:
        return False, f"normalization {spec.name!r} may rewrite text across words"
    if not spec.add_dummy_prefix or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        return False, "whitespace handling differs from Llama-2's (dummy prefix, spaces kept and escaped)"
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return False, "whitespace is a suffix"
    space = "\u2581"
    spanning = [p.piece for p in proto.pieces if re.search(f"[^{space}]{space}", p.piece)]
    if spanning:
        return False, f"{len(spanning)} pieces span a word boundary (e.g. {spanning[0]!r})"
    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    probe = "Word  cache\tprobe, 12 34 ."
    if processor.encode(probe) != WordCacheEncoder(processor).encode_one(probe):
        return False, "the probe text encodes differently word by word"
    return True, "exact"


# A space with a non-space on both sides: the boundaries at which a text splits into independently encoded words.
# Runs of spaces stay inside a word, since whitespace-only pieces ("▁▁") may merge them. A literal U+2581 is a space
# once sentencepiece has escaped the text, so it counts as one on the left: "x▁ 4" is "▁x▁▁4", one run, not two words.
_WORD_BOUNDARY = re.compile(r"(?<=[^ \u2581]) (?=[^ ])")


class WordCacheEncoder:
    """Exact sentencepiece encoding through a cache of word encodings (see the module docstring).

    Check ``word_cache_exactness(model)`` before using it. ``max_words`` bounds the cache (cleared when full), so
    memory stays flat however large the corpus.
    """

    def __init__(self, processor, max_words: int = 1 << 16):
        self.processor = processor
        self.cache: dict = {}
        self.max_words = max_words

    @staticmethod
    def words(text: str) -> list[str]:
        if "  " in text or text[:1] == " " or text[-1:] == " " or "\u2581" in text:
            return _WORD_BOUNDARY.split(text)
        return text.split(" ")

    def encode_words(self, texts_as_words: Sequence[list[str]]) -> None:
        """Make sure every word of ``texts_as_words`` is in the cache (one batched sentencepiece call)."""
        words = set().union(*texts_as_words)
        missing = words.difference(self.cache.keys())
        if len(self.cache) + len(missing) > self.max_words:
            self.cache.clear()
            missing = words
        if missing:
            missing = list(missing)
            self.cache.update(zip(missing, map(tuple, self.processor.encode(missing))))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        words = [self.words(text) for text in texts]
        self.encode_words(words)
        lookup = self.cache.__getitem__
        return [list(chain.from_iterable(map(lookup, w))) for w in words]

    def encode_one(self, text: str) -> list[int]:
        return self.encode([text])[0]


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 2000, **options) -> str:
    """Train a small Llama-2-like sentencepiece BPE model on ``texts``; returns the ``.model`` path.

    Seconds for a few MB of text: the tests and the CPU quickstart train one instead of downloading Llama-2's.
    """
    import sentencepiece

    settings = dict(LLAMA2_LIKE_SPM, vocab_size=vocab_size, num_threads=os.cpu_count() or 1,
                    input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
                    minloglevel=2)
    settings.update(options)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)) or ".", exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=(line for text in texts for line in text.split("\n") if line.strip()),
        model_prefix=model_prefix, **settings)
    return model_prefix + ".model"
