"""Input corpora: JSON lines (optionally gzipped) or plain-text files, read as a stream of line-numbered chunks."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_harpe.command import RunError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


# A JSON "\ud800" escape without its pair decodes to a lone surrogate: a str that is no Unicode text, which no
# tokenizer encodes (sentencepiece raises a TypeError naming no line). Raw UTF-8 bytes cannot hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(RunError, ValueError):  # an input that cannot be read: exit 1
    """A corpus that cannot be read as given; the message says what to do."""


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def expand_inputs(pattern: str) -> list[str]:
    """Files named by ``pattern``: a file, a glob, or a directory (every file under it), in sorted order."""
    if os.path.isdir(pattern):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
                       if not name.startswith("."))
    else:
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise InputError(f"--input {pattern}: no such file (a .jsonl/.json[.gz] file of JSON lines, plain-text files, "
                         "a glob or a directory)")
    unreadable = [p for p in paths if not os.access(p, os.R_OK)]
    if unreadable:
        raise InputError(f"cannot read {unreadable[0]}: check its permissions")
    return paths


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@dataclass
class Chunk:
    """Raw records of one file: JSON lines (``lines``, first at ``first_line``) or one plain-text document."""

    path: str
    first_line: int
    lines: list[bytes]
    jsonl: bool
    nbytes: int


def read_chunks(paths: Sequence[str], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Stream ``paths`` as chunks of about ``chunk_bytes`` of whole lines (a plain-text file is one document)."""
    for path in paths:
        if not is_jsonl(path):
            with _open(path) as f:
                data = f.read()
            yield Chunk(path, 1, [data], jsonl=False, nbytes=len(data))
            continue
        with _open(path) as f:
            line_no = 1
            while True:
                lines = f.readlines(chunk_bytes)
                if not lines:
                    break
                yield Chunk(path, line_no, lines, jsonl=True, nbytes=sum(map(len, lines)))
                line_no += len(lines)


def parse_record(raw: bytes, jsonl: bool, keys: Sequence[str]) -> tuple[dict, str]:
    """``({key: text or list of texts}, "")`` for a good record; ``(None, reason)`` for a malformed one;
    ``({}, "")`` for a blank line (skipped silently, as blank lines at the end of JSONL files are common)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e})"
    if not jsonl:
        return {keys[0]: text}, ""
    if not text.strip():
        return {}, ""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    values = {}
    for key in keys:
        if key not in record:
            return None, f"no key {key!r} (has {', '.join(map(repr, list(record)[:8]))}; choose with --json-keys)"
        value = record[key]
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            return None, f"{key!r} is a {type(value).__name__}, not a string or a list of strings"
        values[key] = value
    if b"\\u" in raw:
        for key, value in values.items():
            for text in value if isinstance(value, list) else [value]:
                found = _SURROGATE.search(text)
                if found:
                    return None, (f"{key!r} holds a lone surrogate \\u{ord(found.group()):04x} (a JSON escape without "
                                  f"its pair, at character {found.start()}), which is not Unicode text")
    return values, ""
