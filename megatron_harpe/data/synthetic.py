"""Synthetic text for the embedded default: filler prose, per-source corpora, and needle/passkey long contexts.

Everything is generated from a seed, offline. The filler reads like English at the token level (Zipf-distributed
words, sentences with abbreviations that a sentence splitter must not break at, paragraphs), which is what a
tokenizer, a sentence splitter and a retrieval test need; it carries no meaning, so a model can only retrieve a
needle from it by attending to the needle.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

_COMMON = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they which one you "
    "were all we her she there would their will when who him been has more if no out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three house river city market letter garden machine winter summer light water music paper "
    "history system number morning evening question answer window mountain village station bridge engine harbour"
).split()
_SYLLABLES = "ka lo mi ra te su ne vo pa li dor fen gar hul mos tir ven bal cor dun".split()
# Abbreviations whose periods do not end a sentence: the case sentence splitters get wrong when untrained.
_ABBREVIATIONS = ("Dr.", "Mr.", "Mrs.", "St.", "Prof.", "e.g.", "i.e.", "etc.", "approx.", "No.")
_NAMES = ("Smith", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Brennan")


@functools.cache
def _vocabulary(size: int = 1500) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """The filler's words (the same for every seed), capitalized, and their Zipf CDF: built once (~20 ms)."""
    rng = np.random.default_rng(12345)
    words = list(_COMMON)
    while len(words) < size:
        words.append("".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))))
    cdf = np.cumsum(1.0 / np.arange(1, len(words) + 1, dtype=np.float64))
    cdf /= cdf[-1]
    cdf.flags.writeable = False
    return tuple(words), tuple(w[0].upper() + w[1:] for w in words), cdf


class FillerText:
    """Seeded pseudo-English prose: ``sentence()``, ``paragraph()``, ``document(n_words)``."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        words, self._capitalized, self._cdf = _vocabulary()
        self.words = list(words)

    def _sentences(self, n_words: int) -> list[str]:
        """Sentences totalling at least ``n_words`` words, drawn in bulk (a document of 100k words in ~0.1 s)."""
        rng = self.rng
        lengths = rng.integers(6, 22, size=n_words // 6 + 1)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_words)) + 1]
        words = np.searchsorted(self._cdf, rng.random(int(lengths.sum())))
        extras = rng.random((len(lengths), 2))
        ends = rng.choice(np.array([".", ".", ".", ".", "?", "!"]), size=len(lengths))
        sentences, start = [], 0
        for length, (abbreviation, number), end in zip(lengths.tolist(), extras.tolist(), ends.tolist()):
            ids = words[start:start + length].tolist()
            start += length
            tokens = [self._capitalized[ids[0]]] + [self.words[i] for i in ids[1:]]
            if abbreviation < 0.15:
                tokens.insert(int(abbreviation * 100) % length,
                              f"{_ABBREVIATIONS[int(abbreviation * 1000) % len(_ABBREVIATIONS)]} "
                              f"{_NAMES[int(abbreviation * 10000) % len(_NAMES)]}")
            if number < 0.1:
                tokens.insert(1 + int(number * 1000) % length, str(2 + int(number * 19980)))
            sentences.append(" ".join(tokens) + end)
        return sentences

    def sentence(self) -> str:
        return self._sentences(1)[0]

    def paragraph(self) -> str:
        return " ".join(self._sentences(int(self.rng.integers(12, 80))))

    def document(self, n_words: int) -> str:
        """At least ``n_words`` words, in paragraphs of 2-6 sentences separated by blank lines."""
        sentences = self._sentences(n_words)
        cuts = np.cumsum(self.rng.integers(2, 7, size=len(sentences)))
        cuts = [0] + cuts[cuts < len(sentences)].tolist() + [len(sentences)]
        return "\n\n".join(" ".join(sentences[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))


# Per-source document lengths (words, log-normal): the shape that makes Fu et al.'s per-source upsampling
# matter. Books and ArXiv are long, C4 and StackExchange short. Scaled down by ``length_scale``.
SOURCE_LENGTHS = {
    "commoncrawl": (900, 1.2),
    "c4": (400, 0.8),
    "github": (700, 1.3),
    "wikipedia": (600, 1.1),
    "book": (20000, 0.8),
    "arxiv": (6000, 0.6),
    "stackexchange": (300, 0.9),
}


def source_documents(source: str, n_docs: int, *, seed: int = 0, length_scale: float = 1.0,
                     max_words: int | None = None) -> Iterator[dict]:
    """JSONL records ``{"text", "source", "id"}`` with ``source``'s document-length distribution."""
    median, sigma = SOURCE_LENGTHS[source]
    filler = FillerText(seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(n_docs):
        n_words = max(5, int(median * length_scale * rng.lognormal(0.0, sigma)))
        if max_words is not None:
            n_words = min(n_words, max_words)
        yield {"text": filler.document(n_words), "source": source, "id": f"{source}-{i}"}


def write_jsonl(records, path: str) -> str:
    """Write records as JSON lines, atomically (a temporary sibling renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --- retrieval contexts -------------------------------------------------------------------------------------

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
CLASSIC_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
CLASSIC_QUESTION = "What is the best thing to do in San Francisco?"
CLASSIC_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
LWM_CITIES = ("Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Lisbon", "Montevideo", "Nairobi",
              "Reykjavik", "Hanoi", "Quito", "Tbilisi", "Oslo", "Lagos", "Kyoto")


def classic_needle(place: str = "San Francisco", activity: str = CLASSIC_ANSWER) -> tuple[str, str, str]:
    """Kamradt's needle, question and answer; the defaults are his (``CLASSIC_NEEDLE``), the evaluation's."""
    return (f"The best thing to do in {place} is {activity}.", f"What is the best thing to do in {place}? Answer:",
            activity)


@dataclass
class RetrievalSample:
    """A long context with one fact hidden at ``depth`` (0 = start, 1 = end of the haystack)."""

    input_ids: list[int]       # context + question, ready for the model; the answer follows it
    answer: str
    answer_ids: list[int]
    depth: float
    needle_position: int       # token index where the needle starts
    kind: str


def _insert(haystack: list[int], needle: list[int], depth: float, is_sentence_end: Callable[[int], bool]) -> tuple:
    """Insert ``needle`` after the last sentence end at or before ``depth`` of the haystack (as Kamradt's NIAH)."""
    target = int(round(depth * len(haystack)))
    at = next((i for i in range(target, 0, -1) if is_sentence_end(haystack[i - 1])), 0)
    return haystack[:at] + needle + haystack[at:], at


def _haystack(encode, filler_text: Callable[[], str], n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` of filler, cut at the start so that it ends on a whole sentence before the question."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(encode(filler_text()))
    return ids[len(ids) - n_tokens:]


def _compose(encode, decode, kind: str, *, context_tokens: int, depth: float, prefix: str, needle: str,
             question: str, answer: str, filler_text: Callable[[], str]) -> RetrievalSample:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prefix_ids = encode(prefix) if prefix else []
    needle_ids, question_ids = encode(needle), encode(question)
    budget = context_tokens - len(prefix_ids) - len(needle_ids) - len(question_ids)
    if budget < 1:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a haystack around the needle and "
                         f"question ({context_tokens - budget} tokens): ask for a longer context")
    haystack = _haystack(encode, filler_text, budget)
    ends = {t for t in set(haystack) if decode([t]).rstrip().endswith((".", "?", "!"))}
    context, at = _insert(haystack, needle_ids, depth, ends.__contains__)
    return RetrievalSample(input_ids=prefix_ids + context + question_ids, answer=answer,
                           answer_ids=encode(answer), depth=depth, needle_position=len(prefix_ids) + at, kind=kind)


def passkey_sample(encode, decode, *, context_tokens: int, depth: float, passkey: int) -> RetrievalSample:
    """Mohtashami & Jaggi's passkey retrieval: repeated garbage sentences with the pass key hidden inside."""
    return _compose(encode, decode, "passkey", context_tokens=context_tokens, depth=depth, prefix=PASSKEY_TASK,
                    needle=f"The pass key is {passkey}. Remember it. {passkey} is the pass key.",
                    question="What is the pass key? The pass key is", answer=str(passkey),
                    filler_text=lambda: PASSKEY_GARBAGE)


def needle_sample(encode, decode, *, context_tokens: int, depth: float, seed: int = 0, style: str = "classic",
                  needle: tuple[str, str, str] | None = None,
                  haystack: Callable[[], str] | None = None) -> RetrievalSample:
    """Needle-in-a-Haystack on synthetic filler prose (or ``haystack()``, called for text until it is long enough).

    ``classic``: Kamradt's San Francisco needle and question. ``ruler``: RULER's single-needle form, a
    7-digit "special magic number" for a random key word. ``lwm``: Large World Model's "special magic {city} number".
    ``needle=(needle, question, answer)`` replaces any of them.
    """
    filler = FillerText(seed)
    if needle is not None:
        needle_text, question, answer = needle
    elif style == "classic":
        needle_text, question, answer = classic_needle()
    elif style == "ruler":
        rng = np.random.default_rng(seed)
        key, value = str(rng.choice(filler.words[200:])), str(int(rng.integers(1_000_000, 10_000_000)))
        needle_text = f"One of the special magic numbers for {key} is: {value}."
        question, answer = f"What is the special magic number for {key} mentioned in the provided text? Answer:", value
    elif style == "lwm":  # Large World Model's needle: a city and a 7-digit number
        rng = np.random.default_rng(seed)
        city, value = str(rng.choice(LWM_CITIES)), str(int(rng.integers(1_000_000, 10_000_000)))
        needle_text = f"The special magic {city} number is: {value}."
        question, answer = f"What is the special magic {city} number? Answer:", value
    else:
        raise ValueError(f"unknown needle style {style!r}: use 'classic', 'ruler' or 'lwm'")
    return _compose(encode, decode, f"niah-{style}", context_tokens=context_tokens, depth=depth, prefix="",
                    needle=needle_text, question=question, answer=answer, filler_text=haystack or filler.paragraph)


# --- retrieval-rich documents: what a model learns retrieval from ---------------------------------------------
#
# Each document is one retrieval prompt built by the evaluation's own builders (passkey_sample, needle_sample,
# megatron_harpe.eval.ruler.ruler_sample: the same instruction, haystack, needles and question), followed by its
# answer and, when the task takes less than the whole document, filler. The evaluation's samples are not training
# documents: every training document draws its seed at or above 2**32 (the evaluation seeds its samples below:
# RULER with 32-bit SeedSequence states, NIAH with its --seed, 0 by default), so its keys, values and haystack come
# from another random stream; classic needles name other places than the evaluation's San Francisco (their
# activities reuse its words, so that its answer is made of trained tokens); a training passkey equals an evaluation
# one only with the same key (1 in 90000), length and depth together.

NIAH_STYLES = ("classic", "ruler", "lwm")
_TRAINING_SEEDS = 2**32  # evaluation seeds lie below
# Kamradt-style activities: the classic needle's form with other places and things to do.
_ACTIVITIES = ("eat a sandwich", "sit in Dolores Park", "read a book", "walk along the river", "visit the old market",
               "drink a coffee", "watch the boats", "climb the hill", "ride a bicycle", "listen to music",
               "buy fresh bread", "swim in the lake", "sit in the garden", "see the bridge")
_TIMES = ("on a sunny day", "in the morning", "at night", "after lunch", "in the evening", "on a rainy day",
          "in winter", "in summer")


def retrieval_kinds() -> tuple[str, ...]:
    """Every task a retrieval document can carry: passkey, the NIAH styles, RULER's eight tasks."""
    from megatron_harpe.eval.ruler import TASKS

    return ("passkey", *(f"niah-{style}" for style in NIAH_STYLES), *(f"ruler-{task}" for task in TASKS))


class WordCodec:
    """Whitespace-separated words as token ids: lengths counted in words, for text made before a tokenizer exists."""

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self._ids:
                self._ids[word] = len(self._words)
                self._words.append(word)
            ids.append(self._ids[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids)


def _prompt(kind: str, encode, decode, context_tokens: int, seed: int) -> tuple[list[int], list[str]]:
    """The evaluation's prompt of ``kind`` (``context_tokens`` ids, no BOS) and the answers it expects."""
    from megatron_harpe.eval.ruler import ruler_sample

    rng = np.random.default_rng(seed)
    if kind == "passkey":
        passkey = int(rng.integers(10_000, 100_000))  # eval_passkey's range
        sample = passkey_sample(encode, decode, context_tokens=context_tokens, depth=float(rng.random()),
                                passkey=passkey)
        return sample.input_ids, [sample.answer]
    if kind.startswith("niah-"):
        style = kind[len("niah-"):]
        needle = None
        if style == "classic":
            first, second = rng.choice(len(_ACTIVITIES), size=2, replace=False)
            activity = f"{_ACTIVITIES[first]} and {_ACTIVITIES[second]} {_TIMES[rng.integers(len(_TIMES))]}"
            needle = classic_needle(str(rng.choice(LWM_CITIES)), activity)
        sample = needle_sample(encode, decode, context_tokens=context_tokens, depth=float(rng.random()), seed=seed,
                               style=style, needle=needle)
        return sample.input_ids, [sample.answer]
    sample = ruler_sample(kind[len("ruler-"):], encode, decode, context_tokens=context_tokens, seed=seed)
    return sample.input_ids, sample.answers


def _filler_to(text: str, tokens: int, encode, filler: FillerText) -> str:
    """``text`` with filler words after it until it is exactly ``tokens`` long (when the tokenizer allows)."""
    count, tail = len(encode(text)), []
    words, misses = iter(()), 0
    while count < tokens:
        word = next(words, None)
        if word is None:
            words = iter(filler.sentence().split())
            continue
        size = len(encode(word))  # a word's ids do not depend on its neighbours (see data/tokenizer.py)
        if count + size <= tokens:
            tail.append(word)
            count, misses = count + size, 0
        elif (misses := misses + 1) > 10_000:  # no filler word is short enough: a tokenizer without 1-id words
            raise ValueError(f"no filler word fits the last {tokens - count} token(s)")
    return " ".join([text, *tail]) if tail else text


def retrieval_document(kind: str, encode, decode, *, tokens: int, seed: int, task_share: float = 1.0) -> dict:
    """One document of ``tokens`` ids (as ``encode`` counts them): ``kind``'s prompt, its answer, then filler.

    The prompt and answer take ``task_share`` of the document. Returns the record's fields besides ``id`` and
    ``source``: ``text``, ``kind``, ``seed`` (the builder's), ``answer`` (the expected values, joined by ", "),
    ``question_start`` and ``answer_start`` (character offsets in ``text``), ``needles`` (each expected value and
    the offset where it stands).
    """
    if kind not in retrieval_kinds():
        raise ValueError(f"unknown retrieval kind {kind!r}: choose from {', '.join(retrieval_kinds())}")
    if not 0.0 < task_share <= 1.0:
        raise ValueError(f"task_share must be in (0, 1], got {task_share}")
    task_tokens = max(1, int(round(task_share * tokens)))
    _, answers = _prompt(kind, encode, decode, task_tokens, seed)  # keys and values do not depend on the length
    answer = ", ".join(answers)
    context = task_tokens - len(encode(f"{answer}."))
    for _ in range(4):  # the decoded prompt may re-encode a few ids longer: shorten and rebuild
        ids, _ = _prompt(kind, encode, decode, context, seed)
        prompt = decode(ids)
        text = f"{prompt} {answer}."
        excess = len(encode(text)) - task_tokens
        if excess <= 0:
            break
        context -= excess
    else:
        raise ValueError(f"could not fit a {kind} document into {tokens} tokens")
    answer_start = len(prompt) + 1
    text = _filler_to(text, tokens, encode, FillerText(seed + 1))
    needles, at = [], 0
    for value in answers:  # the first occurrence: values are drawn to be unique and the question names only keys
        at = text.index(value)
        needles.append({"value": value, "start": at})
    return {"text": text, "kind": kind, "seed": seed, "answer": answer,
            "question_start": text.rindex("What", 0, answer_start), "answer_start": answer_start, "needles": needles}


def retrieval_documents(n_docs: int, text_tokens: tuple[int, int], encode, decode, *, seed: int = 0,
                        kinds: Sequence[str] | None = None, task_share: tuple[float, float] = (1.0, 1.0),
                        source: str = "retrieval") -> Iterator[dict]:
    """JSONL records ``{"text", "source", "id", ...}`` (:func:`retrieval_document`'s fields), one task each.

    Each document's length is drawn uniformly from ``text_tokens`` (ids of ``encode``: a sentencepiece model's, or
    :class:`WordCodec`'s words), its kind uniformly from ``kinds`` (default: all of :func:`retrieval_kinds`), the
    share of it its task takes uniformly from ``task_share``.
    """
    kinds = list(kinds or retrieval_kinds())
    lo, hi = text_tokens
    if not 1 <= lo <= hi:
        raise ValueError(f"text_tokens must satisfy 1 <= min <= max, got {text_tokens}")
    if not 0.0 < task_share[0] <= task_share[1] <= 1.0:
        raise ValueError(f"task_share must satisfy 0 < min <= max <= 1, got {task_share}")
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        kind = kinds[int(rng.integers(len(kinds)))]
        doc_seed = _TRAINING_SEEDS + int(rng.integers(0, 2**62))
        tokens = int(rng.integers(lo, hi + 1))
        share = float(rng.uniform(*task_share))
        try:
            record = retrieval_document(kind, encode, decode, tokens=tokens, seed=doc_seed, task_share=share)
        except ValueError as e:
            raise ValueError(f"{source}: a {kind} document of {tokens} tokens cannot be built ({e}): make the "
                             f"documents longer or leave {kind} out") from None
        yield {"text": record.pop("text"), "source": source, "id": f"{source}-{i}", **record}


# --- the corpus of harpe-make-synthetic-corpus (megatron_harpe.data.cli) -------------------------------------

def make_corpus(out_dir: str, docs_per_source: int = 200, length_scale: float = 0.25, vocab_size: int = 2000,
                seed: int = 0, sources=tuple(SOURCE_LENGTHS)) -> dict:
    """``out_dir/sources/<source>.jsonl`` and ``out_dir/tokenizer.model`` (sentencepiece, trained on a sample)."""
    from megatron_harpe.data.tokenizer import train_sentencepiece

    paths = {}
    for index, source in enumerate(sources):
        paths[source] = write_jsonl(source_documents(source, docs_per_source, seed=seed + 101 * index,
                                                     length_scale=length_scale),
                                    os.path.join(out_dir, "sources", f"{source}.jsonl"))
    sample = (json.loads(line)["text"] for path in paths.values()
              for line in itertools.islice(open(path, encoding="utf-8"), 50))
    model = train_sentencepiece(sample, os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size)
    return {"sources": paths, "tokenizer_model": model}


@dataclass(frozen=True)
class RetrievalPart:
    """A part of a retrieval corpus: ``docs`` documents of ``min_tokens``..``max_tokens`` tokens each, counted as
    in the indexed dataset (text + EOD: tools/preprocess_data.py --append-eod with the corpus tokenizer; megatron's
    Llama2Tokenizer adds no BOS). Documents of exactly ``--seq-length`` tokens are Megatron's training samples one
    for one (GPTDataset cuts the stream every ``seq_length`` tokens), so no task is cut in two."""

    name: str
    docs: int
    min_tokens: int
    max_tokens: int

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"part name {self.name!r}: use letters, digits, '-' and '_' (it names a file)")
        if self.docs < 1:
            raise ValueError(f"part {self.name}: {self.docs} documents: give at least 1")
        if not 2 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"part {self.name}: lengths {self.min_tokens}-{self.max_tokens}: give "
                             "2 <= min <= max tokens (EOD counts)")


def make_retrieval_corpus(out_dir: str, parts: Sequence[RetrievalPart], vocab_size: int = 2000, seed: int = 0,
                          kinds: Sequence[str] | None = None, task_share: tuple[float, float] = (1.0, 1.0)) -> dict:
    """``out_dir/parts/<name>.jsonl`` per part, all tokenized by one ``out_dir/tokenizer.model``.

    The tokenizer is trained first, on filler and on retrieval documents measured in words (:class:`WordCodec`);
    the parts are then built with it, so each document has exactly its drawn number of tokens.
    """
    from megatron_harpe.data.tokenizer import load_sentencepiece, train_sentencepiece

    if not parts or len({part.name for part in parts}) != len(parts):
        raise ValueError("give one or more parts, with distinct names")
    words = WordCodec()  # long enough for every kind: the parts' lengths are checked in tokens, below
    sample = [record["text"] for record in retrieval_documents(300, (400, 800), words.encode, words.decode,
                                                               seed=seed, kinds=kinds)]
    sample += [FillerText(seed + 1).document(3000) for _ in range(20)]
    processor = load_sentencepiece(train_sentencepiece(sample, os.path.join(out_dir, "tokenizer"), vocab_size))
    paths = {}
    for index, part in enumerate(parts):
        records = retrieval_documents(part.docs, (part.min_tokens - 1, part.max_tokens - 1), processor.encode,
                                      processor.decode, seed=int(np.random.SeedSequence([seed, index + 1])
                                                                 .generate_state(1)[0]),
                                      kinds=kinds, task_share=task_share, source=part.name)
        paths[part.name] = write_jsonl(records, os.path.join(out_dir, "parts", f"{part.name}.jsonl"))
    return {"parts": paths, "tokenizer_model": os.path.join(out_dir, "tokenizer.model")}

