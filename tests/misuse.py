"""The misuse table's row type and runner (issue 15).

Every row is one wrong use of a command a user runs: what they typed, what they must read, the exit status, and the
promise that nothing they had was changed and nothing partial was left. The rows live beside the tests of the package
part they exercise (``tests/<part>/misuse_cases.py``, a list ``CASES``); ``tests/test_misuse.py`` runs them all.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Misuse:
    """One wrong use.

    ``argv`` is formatted with ``{tmp}`` and every name ``setup`` returns. It runs in this process when ``entry`` names
    a ``module:function`` taking argv (fast: no interpreter start), else as a subprocess (``argv[0]`` a program,
    e.g. ``bash`` or ``PYTHON``), with ``env`` added to a copy of the environment.
    """

    finding: str  # issue 15's numbered item this row covers, e.g. "1"
    name: str
    argv: Sequence[str]
    message: str  # a regular expression that must appear in stderr (or stdout) - the "what to do" part
    entry: str | None = None
    setup: Callable[[Path, Callable[[str], object]], dict[str, str]] | None = None  # (tmp, getfixturevalue)
    exit_code: int | None = None  # None: any non-zero status
    env: dict[str, str] = field(default_factory=dict)
    # Paths (formatted like argv) whose whole tree must be byte-for-byte what it was; tmp is always checked.
    unchanged: Sequence[str] = ()
    timeout: float = 120.0

    @property
    def id(self) -> str:
        return f"{self.finding}-{self.name}"


def tree_snapshot(path: Path) -> dict[str, str]:
    """{relative path: content digest, or 'dir'/'link'} for every entry under ``path`` (hidden ones too)."""
    snap: dict[str, str] = {}
    if not path.exists():
        return snap
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            full = Path(root, d)
            snap[str(full.relative_to(path))] = "link" if full.is_symlink() else "dir"
        for f in files:
            full = Path(root, f)
            rel = str(full.relative_to(path))
            snap[rel] = "link" if full.is_symlink() else hashlib.sha256(full.read_bytes()).hexdigest()
    return snap


@dataclass
class Outcome:
    code: int
    output: str


def _run_in_process(entry: str, argv: list[str], capsys) -> Outcome:
    module, function = entry.split(":")
    main = getattr(importlib.import_module(module), function)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse, or a main that exits
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return Outcome(int(code or 0), out.err + out.out)


def _run_subprocess(case: Misuse, argv: list[str], tmp: Path) -> Outcome:
    # A user's shell, not this test process's: in-process tests leave torch.distributed's rendezvous variables
    # (MASTER_PORT of a store this process still serves) in os.environ.
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(case.env)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=case.timeout)
    return Outcome(proc.returncode, proc.stderr + proc.stdout)


def run_case(case: Misuse, tmp: Path, getfixturevalue, capsys) -> Outcome:
    names = {"tmp": str(tmp), "python": PYTHON, "root": str(ROOT)}
    if case.setup is not None:
        names.update(case.setup(tmp, getfixturevalue) or {})
    argv = [a.format(**names) for a in case.argv]
    watched = [tmp] + [Path(p.format(**names)) for p in case.unchanged]
    before = {str(p): tree_snapshot(p) for p in watched}
    outcome = _run_in_process(case.entry, argv, capsys) if case.entry else _run_subprocess(case, argv, tmp)
    shown = f"$ {' '.join(argv)}\nexit {outcome.code}\n{outcome.output[-4000:]}"
    if case.exit_code is None:
        assert outcome.code != 0, f"expected a non-zero exit:\n{shown}"
    else:
        assert outcome.code == case.exit_code, f"expected exit {case.exit_code}:\n{shown}"
    assert re.search(case.message, outcome.output), f"expected /{case.message}/ in the output:\n{shown}"
    assert "Traceback (most recent call last)" not in outcome.output, f"a traceback instead of an error:\n{shown}"
    for p in watched:
        after = tree_snapshot(p)
        assert after == before[str(p)], (f"{p} changed: added {sorted(set(after) - set(before[str(p)]))}, removed "
                                         f"{sorted(set(before[str(p)]) - set(after))}, modified "
                                         f"{sorted(k for k in after if k in before[str(p)] and after[k] != before[str(p)][k])}"
                                         f"\n{shown}")
    return outcome
