"""Write results atomically: into a temporary sibling, renamed into place when complete (a directory or files)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Dict, Sequence


class OutputExistsError(FileExistsError):
    pass


@contextmanager
def atomic_output_dir(path: str, force: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block completes.

    An existing non-empty ``path`` is refused unless ``force`` (then replaced only at the end).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not force:
        raise OutputExistsError(f"{path} exists and is not empty: choose another output directory or pass --force")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.replace(tmp, path)


@contextmanager
def atomic_output_files(paths: Sequence[str], force: bool = False):
    """Yield ``{path as given: temporary path}``; every temporary file becomes its final path only if the block completes.

    The files share one directory (created if needed); existing ones are refused unless ``force`` (then replaced
    only at the end). Nothing is left behind on failure.
    """
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists: choose another --output-prefix or pass --force to replace it")
    parents = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(parents) != 1:
        raise ValueError(f"atomic_output_files writes into one directory, got {sorted(parents)}")
    parent = parents.pop()
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        staged: Dict[str, str] = {p: os.path.join(staging, os.path.basename(p)) for p in paths}
        yield staged
        for final, temporary in staged.items():
            os.replace(temporary, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
