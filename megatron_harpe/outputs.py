"""Write a directory of results atomically: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager


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
