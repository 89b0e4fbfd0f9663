"""Tokenize corpora into Megatron's indexed datasets (``.bin``/``.idx``), with Megatron-LM's flags and token stream.

Same flags, file names (``{prefix}_{key}_{document|sentence}``), ids and document/sentence structure as Megatron-LM's
``tools/preprocess_data.py``, 2.6x its throughput per worker on real text with Llama-2's tokenizer
(``benchmarks/README.md``). Where the time goes there (a pickled list per document crossing processes, one
tokenizer call per document) is replaced by 1 MB chunks per task, exact word-cached sentencepiece encoding
(``tokenizer.WordCacheEncoder``) and one numpy array per chunk back. Memory stays flat: at most ``2 x workers`` chunks are in flight and the word cache is bounded.
Differences, on purpose: sentence splitting works offline, nothing is overwritten without ``--force``, output
appears only when complete, a malformed line is an error naming its line (or is skipped with
``--skip-bad-lines``), blank lines are skipped, and plain-text files (one document each) are read too.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron_harpe.command import RunError, UsageError
from megatron_harpe.data.inputs import Chunk, expand_inputs, parse_record, read_chunks
from megatron_harpe.outputs import atomic_output_files

log = logging.getLogger(__name__)

PUNKT_TRAINING_BYTES = 1 << 20


class PreprocessError(RunError, RuntimeError):
    """Bad input found while tokenizing; nothing was written."""


# --- the work of one chunk (in a worker process, or in-process with --workers 1) -------------------------------

@dataclass
class EncodedKey:
    tokens: np.ndarray                 # all tokens of the chunk's documents, EOD included
    sequence_lengths: list[int]        # one per sentence (per document without --split-sentences)
    sequences_per_document: list[int]


@dataclass
class EncodedChunk:
    path: str
    nbytes: int
    documents: int = 0
    keys: dict[str, EncodedKey] = field(default_factory=dict)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class EncodeSettings:
    keys: list[str]
    append_eod: bool
    eod: int
    dtype: type
    skip_bad_lines: bool
    split_sentences: bool
    keep_newlines: bool = False
    punkt_params: object = None


# Set in the parent before the worker pool forks: the encoder (a sentencepiece processor, a word cache) is
# inherited instead of being rebuilt or pickled per task.
_STATE: dict = {}


def _install_state(settings: EncodeSettings, encode) -> None:
    from megatron_harpe.data.sentences import SentenceSplitter

    _STATE.update(settings=settings, encode=encode,
                  splitter=SentenceSplitter(settings.punkt_params, settings.keep_newlines)
                  if settings.split_sentences else None)


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    settings, encode, splitter = _STATE["settings"], _STATE["encode"], _STATE["splitter"]
    result = EncodedChunk(chunk.path, chunk.nbytes)
    records = []
    for offset, raw in enumerate(chunk.lines):
        values, reason = parse_record(raw, chunk.jsonl, settings.keys)
        if values is None:
            result.bad_lines.append((chunk.first_line + offset, reason))
            if not settings.skip_bad_lines:
                return result
        elif values:
            records.append(values)
    result.documents = len(records)
    for key in settings.keys:
        texts, counts = [], []
        for record in records:
            value = record[key]
            # A list is already split into sentences (as in Megatron-LM); a string is split on request.
            sentences = value if isinstance(value, list) else splitter.split(value) if splitter else [value]
            texts.extend(sentences)
            counts.append(len(sentences))
        ids = iter(encode(texts))
        parts, lengths, per_document = [], [], []
        for count in counts:
            # Megatron-LM's document: its non-empty sentences, EOD after the last one (none for an empty document).
            sentences = [s for s in itertools.islice(ids, count) if len(s)]
            sentence_lengths = [len(s) for s in sentences]
            parts.extend(sentences)
            if settings.append_eod and sentences:
                parts.append((settings.eod,))
                sentence_lengths[-1] += 1
            lengths.extend(sentence_lengths)
            per_document.append(len(sentence_lengths))
        tokens = np.fromiter(itertools.chain.from_iterable(parts), dtype=settings.dtype, count=sum(lengths))
        result.keys[key] = EncodedKey(tokens, lengths, per_document)
    return result


def _ordered_map(function, items: Iterable, workers: int) -> Iterator:
    """``map(function, items)`` over ``workers`` forked processes, in order, with at most 2 x workers in flight.

    As in Megatron-LM, ``workers`` processes encode while this one reads and writes (``workers=0``: all in here).
    """
    if workers == 0:
        yield from map(function, items)
        return
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        # Workers leave on close's sentinel. Pool.__exit__ would SIGTERM them instead, and a worker that takes the
        # signal just before it blocks on the task queue's lock runs its Python handler too late: it waits forever.
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # after join: nothing left; on an error or a signal: stop the workers


# --- the run -------------------------------------------------------------------------------------------------

@dataclass
class PreprocessResult:
    outputs: dict[str, str]            # key -> path prefix of its .bin/.idx
    documents: int
    tokens: dict[str, int]
    sequences: dict[str, int]
    bad_lines: int
    seconds: float
    encoder: str
    splitter: str | None = None


def _punkt_training_texts(paths: list[str], keys: list[str]) -> Iterator[str]:
    """The first few MB of the corpus' text, to train punkt on when nltk has no installed model."""
    budget = PUNKT_TRAINING_BYTES
    for chunk in read_chunks(paths):
        for raw in chunk.lines:
            values, _ = parse_record(raw, chunk.jsonl, keys)
            for value in (values or {}).values():
                for text in value if isinstance(value, list) else [value]:
                    yield text[:budget]
                    budget -= len(text)
                    if budget <= 0:
                        return


def output_prefixes(output_prefix: str, keys: list[str], split_sentences: bool) -> dict[str, str]:
    level = "sentence" if split_sentences else "document"
    return {key: f"{output_prefix}_{key}_{level}" for key in keys}


def preprocess(args: argparse.Namespace, progress: bool = True) -> PreprocessResult:
    """Tokenize ``args.input`` into ``{output_prefix}_{key}_{level}.bin/.idx`` for each JSON key."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    from megatron_harpe.data.tokenizer import build_tokenizer, text_encoder, with_preprocessing_defaults

    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: use 1 or more (0 encodes in the main process)")
    if not args.tokenizer_type:
        raise UsageError("--tokenizer-type is required: SentencePieceTokenizer (or Llama2Tokenizer) with "
                         "--tokenizer-model path/to/tokenizer.model, as for Megatron-LM's preprocess_data.py")
    paths = expand_inputs(args.input)
    prefixes = output_prefixes(args.output_prefix, args.json_keys, args.split_sentences)
    files = [path_of(prefix) for prefix in prefixes.values() for path_of in (get_bin_path, get_idx_path)]
    with atomic_output_files(files, force=args.force) as staged:
        tokenizer = build_tokenizer(with_preprocessing_defaults(args))
        encode, encoder_name = text_encoder(tokenizer, args.tokenizer_model)
        settings = EncodeSettings(keys=list(args.json_keys), append_eod=args.append_eod,
                                  eod=tokenizer.eod if args.append_eod else -1,
                                  dtype=DType.optimal_dtype(tokenizer.vocab_size), skip_bad_lines=args.skip_bad_lines,
                                  split_sentences=args.split_sentences, keep_newlines=args.keep_newlines)
        splitter_name = None
        if args.split_sentences:
            from megatron_harpe.data.sentences import punkt_parameters

            settings.punkt_params, splitter_name = punkt_parameters(args.lang,
                                                                    _punkt_training_texts(paths, settings.keys))
        _install_state(settings, encode)
        log.info("tokenizing %d file(s) with %s, %d worker(s)", len(paths), encoder_name, args.workers)

        start = time.perf_counter()
        builders = {key: IndexedDatasetBuilder(staged[get_bin_path(prefix)], dtype=settings.dtype)
                    for key, prefix in prefixes.items()}
        documents, bad = 0, []
        tokens = dict.fromkeys(settings.keys, 0)
        sequences = dict.fromkeys(settings.keys, 0)
        total = None if any(p.endswith(".gz") for p in paths) else sum(os.path.getsize(p) for p in paths)
        chunks = _ordered_map(encode_chunk, read_chunks(paths), args.workers)
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
                  mininterval=1.0) as bar:
            for chunk in chunks:
                if chunk.bad_lines and not args.skip_bad_lines:
                    line, reason = chunk.bad_lines[0]
                    raise PreprocessError(f"{chunk.path} line {line}: {reason}. Nothing was written: fix the line, "
                                          "or pass --skip-bad-lines to count and skip malformed lines")
                bad.extend((chunk.path, line, reason) for line, reason in chunk.bad_lines)
                documents += chunk.documents
                for key, encoded in chunk.keys.items():
                    _write_documents(builders[key], encoded)
                    tokens[key] += len(encoded.tokens)
                    sequences[key] += len(encoded.sequence_lengths)
                bar.update(chunk.nbytes)
        _refuse_empty(args.input, documents, tokens, len(bad))
        for key, builder in builders.items():
            builder.finalize(staged[get_idx_path(prefixes[key])])
    for path, line, reason in bad[:5]:
        log.warning("skipped %s line %d: %s", path, line, reason)
    return PreprocessResult(outputs=prefixes, documents=documents, tokens=tokens, sequences=sequences,
                            bad_lines=len(bad), seconds=time.perf_counter() - start, encoder=encoder_name,
                            splitter=splitter_name)


def _refuse_empty(source: str, documents: int, tokens: dict[str, int], skipped: int) -> None:
    """A dataset without a token trains on nothing (Megatron fails much later, far from the cause): refuse it."""
    if documents == 0:
        raise PreprocessError(f"--input {source}: no documents (the input is empty or only blank lines"
                              + (f"; {skipped} bad line(s) skipped" if skipped else "") + "). Nothing was written")
    empty = [key for key, count in tokens.items() if count == 0]
    if empty:
        raise PreprocessError(f"--input {source}: {', '.join(map(repr, empty))} is empty text in all {documents} "
                              "document(s). Nothing was written: check the input and --json-keys")


def _write_documents(builder, encoded: EncodedKey) -> None:
    token_start = sequence_start = 0
    lengths = encoded.sequence_lengths
    for count in encoded.sequences_per_document:
        document_lengths = lengths[sequence_start:sequence_start + count]
        token_end = token_start + sum(document_lengths)
        builder.add_document(encoded.tokens[token_start:token_end], document_lengths)
        token_start, sequence_start = token_end, sequence_start + count
