"""A step's output goes to its log file; a failure shows the log's tail and names the file."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from megatron_harpe.command import RunError


class CompareError(RunError):
    """A step of the comparison failed; the message names its log."""


def tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).rstrip()


def failed(what: str, status: int, log_path: str) -> CompareError:
    return CompareError(f"{what} failed (exit {status}):\n{tail(log_path)}\nwhole log: {log_path}")


def run_entry(entry: Callable[[list[str]], int], argv: list[str], log_path: str, what: str) -> None:
    """One of the project's commands, in this process, its output appended to ``log_path``."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("$ " + entry.__name__ + " " + " ".join(argv), flush=True)
        status = entry(argv)
    if status != 0:
        raise failed(what, status, log_path)
