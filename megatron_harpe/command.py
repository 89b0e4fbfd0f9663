"""What every command shares: one error base class that carries its exit status, and one runner that reports it.

Exit status 2 is bad usage (a flag, a value or a combination the command refuses before doing any work), 1 a
failed run (an input that cannot be read, an output that may not be replaced, a full disk). A command's body
raises; :func:`run_command` prints ``error: <message>`` on stderr, one line and no traceback, and returns the
status. Nothing here imports torch or megatron: ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = 2
FAILED = 1


class CommandError(Exception):
    """An error a command reports as one line; ``exit_code`` says whose it is (the class default, or given)."""

    exit_code = FAILED

    def __init__(self, *args, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CommandError, ValueError):
    """The command line is wrong: the message says which flag and what to give instead."""

    exit_code = USAGE


class RunError(CommandError):
    """The run could not be done as asked: the message says what to fix."""

    exit_code = FAILED


def report(error: BaseException, exit_code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return exit_code


def run_command(body: Callable[[], int | None], *, usage: tuple[type[BaseException], ...] = (),
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """``body()``'s status (None: 0). A :class:`CommandError` exits with its own code; the exception types in
    ``usage`` / ``failures`` (other libraries' errors a command expects, e.g. ``FileNotFoundError``) with 2 / 1."""
    try:
        status = body()
    except CommandError as e:
        return report(e, e.exit_code)
    except usage as e:
        return report(e, USAGE)
    except failures as e:
        return report(e, FAILED)
    return 0 if status is None else int(status)
