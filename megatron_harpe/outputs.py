"""Write results atomically: into a hidden staging sibling, renamed into place when complete (a directory or files).

What these promise (issue 15):

- nothing a user wrote is replaced: an output directory gets a manifest of what the tool wrote, and ``force``
  replaces a directory only when everything in it is in that manifest; ``--out`` may not be, lie inside, or hold
  an input (:func:`refuse_overlap`);
- nothing partial stays: the staging is removed on an exception, and on SIGTERM/SIGINT (``scancel``, a SLURM time
  limit, Ctrl-C) before the signal is re-delivered; one left by a killed process (SIGKILL) records its owner and is
  swept by the next run on the same host once that process is gone;
- a full disk is one line naming the output, not torch's ``enforce fail at inline_container.cc``;
- the final output has the permissions the user's umask gives a plain ``mkdir`` (staging is private, 0700).

Standard library only: ``--help`` of the tools must stay light.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from megatron_harpe.command import RunError

MANIFEST = ".megatron-harpe-manifest.json"  # in every output directory: the tool and the entries it wrote
OWNER = ".megatron-harpe-owner.json"  # in every staging directory: the pid and host writing it
PARTIAL = ".partial-"  # in every staging directory's name
_BOOKKEEPING = (MANIFEST, OWNER)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class OutputError(RunError, OSError):  # exit 1: a failed run, not a bad flag
    """An output that must not or cannot be written; the message says what to do."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and is not ours to replace (or ``--force`` was not given)."""


class OutputOverlapError(OutputExistsError):
    """The output is, lies inside, or holds one of the inputs."""


class DiskFullError(OutputError):
    """The disk (or the quota) filled up while writing; nothing partial was left."""


# --- where an output may go --------------------------------------------------------------------------------------

def refuse_overlap(out: str, inputs: Mapping[str, str | None], out_flag: str = "--out") -> None:
    """Refuse ``out`` equal to, inside, or above (an ancestor of) any input: replacing it would destroy the input.

    ``inputs`` maps a flag name (for the message) to a path; ``None`` entries are skipped. Symlinks are resolved.
    """
    target = os.path.realpath(out)
    for flag, path in inputs.items():
        if path is None:
            continue
        source = os.path.realpath(path)
        if target == source:
            relation = "is"
        elif _is_within(target, source):
            relation = "is inside"
        elif _is_within(source, target):
            relation = "holds"
        else:
            continue
        raise OutputOverlapError(f"{out_flag} {out} {relation} {flag} {path}: writing it would replace the input; "
                                 f"choose an {out_flag} outside the inputs")


def _is_within(path: str, ancestor: str) -> bool:
    return os.path.commonpath([path, ancestor]) == ancestor and path != ancestor


def _entries(root: str) -> list[str]:
    """Every file, directory and link under ``root`` (relative, '/'-separated), the bookkeeping files excepted."""
    found = []
    for parent, dirs, files in os.walk(root):
        rel = os.path.relpath(parent, root)
        for name in dirs + files:
            entry = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            if entry not in _BOOKKEEPING:
                found.append(entry)
    return sorted(found)


def _read_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("entries"), list) else None


def _foreign_entries(path: str, manifest: dict) -> list[str]:
    """Entries of ``path`` the manifest does not list, outermost only (a foreign folder, not all its files)."""
    ours = set(manifest["entries"])
    foreign: list[str] = []
    for entry in _entries(path):
        if entry not in ours and not any(entry.startswith(f + "/") for f in foreign):
            foreign.append(entry)
    return foreign


def check_output_dir(path: str, force: bool = False) -> None:
    """Raise :class:`OutputExistsError` unless ``path`` can become the output (run it before any long work).

    Absent or empty: fine. Not empty: needs ``force``, and then a manifest listing everything in it.
    """
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputExistsError(f"{path} exists and is not a directory: choose another output directory")
    present = os.listdir(path)
    if not present:
        return
    if not force:
        raise OutputExistsError(f"{path} exists and is not empty: choose another output directory or pass --force")
    manifest = _read_manifest(path)
    if manifest is None:
        shown = ", ".join(sorted(present)[:5]) + (", ..." if len(present) > 5 else "")
        raise OutputExistsError(f"{path} was not written by megatron-harpe (no {MANIFEST}; it holds {shown}): "
                                "--force replaces only a tool's own output; choose another output directory or "
                                "remove it yourself")
    foreign = _foreign_entries(path, manifest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"{path} holds {shown}, which {manifest.get('tool', 'the tool')} did not write: "
                                "--force would delete them; choose another output directory or remove them yourself")


# --- staging: owner record, stale sweep, permissions ------------------------------------------------------------

def _make_staging(parent: str, prefix: str) -> str:
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(staging, OWNER), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return staging


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(parent: str) -> list[str]:
    """Remove staging directories in ``parent`` whose owner process died on this host (SIGKILL, a node reboot).

    Only directories carrying our owner record are considered; another host's, a live process's, or one without
    a readable record is kept. Returns what was removed.
    """
    removed = []
    host = socket.gethostname()
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        staging = os.path.join(parent, name)
        if not (name.startswith(".") and PARTIAL in name) or os.path.islink(staging) or not os.path.isdir(staging):
            continue
        try:
            with open(os.path.join(staging, OWNER)) as f:
                owner = json.load(f)
            pid, owner_host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner_host == host and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # the portable way reads it by setting it
    os.umask(mask)
    return mask


def _as_if_created_normally(path: str, umask: int) -> None:
    """The mode a plain ``open``/``mkdir`` gives under ``umask`` (mkdtemp, mkstemp and safetensors make 0700/0600)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return
    executable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
    os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def _publish(staging: str, tool: str) -> None:
    """Make a finished staging directory a normal output: manifest in, owner record out, umask permissions."""
    os.remove(os.path.join(staging, OWNER))
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump({"tool": tool, "entries": _entries(staging)}, f, indent=1)
    umask = _umask()
    for parent, dirs, files in os.walk(staging):
        for name in dirs + files:
            _as_if_created_normally(os.path.join(parent, name), umask)
    _as_if_created_normally(staging, umask)


# --- signals ------------------------------------------------------------------------------------------------------

class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalGuard:
    """While installed (main thread only), SIGTERM/SIGINT raise :class:`_Interrupted` so that cleanup runs;
    inside :meth:`deferred` they are held until the end (a rename into place must not be cut in half)."""

    def __init__(self):
        self.previous: dict[int, object] = {}
        self.deferring = False
        self.pending: int | None = None
        self.owner = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self.owner:
            # A forked child (a multiprocessing worker) inherits the handler but owns no staging: it must die as it
            # would have without us, not raise inside the pool's machinery (it would hold the queue lock forever).
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if self.deferring:
            self.pending = signum
            return
        raise _Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in _SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: installed outside Python
        self.previous = {}

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


def _redeliver(signum: int) -> None:
    """The signal again, to the handler that was there before us (by default: death by it, status 128 + signum)."""
    signal.raise_signal(signum)


@contextmanager
def _interruptible() -> Iterator[_SignalGuard]:
    guard = _SignalGuard()
    guard.install()
    try:
        yield guard
    except _Interrupted as stop:
        guard.restore()
        _redeliver(stop.signum)
        raise SystemExit(128 + stop.signum) from None  # the previous handler ignored it: the work is undone anyway
    finally:
        guard.restore()
        if guard.pending is not None:  # arrived while the finished output was renamed into place
            _redeliver(guard.pending)


# --- disk full ----------------------------------------------------------------------------------------------------

# torch.save reports ENOSPC as "[enforce fail at inline_container.cc:...] PytorchStreamWriter failed writing file
# data/0: file write failed" or "... unexpected pos N vs M", without an errno.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "PytorchStreamWriter failed", "file write failed",
                   "unexpected pos")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ENOSPC/EDQUOT, also as torch's zip writer reports it."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, (OSError, RuntimeError)) and any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
    return False


def _disk_full_error(path: str, exc: BaseException) -> DiskFullError:
    where = os.path.dirname(path)
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.1f} GiB free now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"writing {path} failed: no space left on the device (or the quota) of {where} ({free}, "
                         "after removing the partial output): free space there or choose another output location, "
                         "then run again")


# --- the two writers ----------------------------------------------------------------------------------------------

@contextmanager
def atomic_output_dir(path: str, force: bool = False, *, tool: str = "megatron-harpe",
                      inputs: Mapping[str, str | None] | None = None):
    """Yield a staging directory that becomes ``path`` only if the block completes.

    An existing non-empty ``path`` is refused unless ``force``, and even then unless its manifest lists everything
    in it (it was all written by a tool of this package); it is replaced only at the end. ``inputs`` ({flag: path})
    are refused as ``path``, inside it or around it (:func:`refuse_overlap`).
    """
    path = os.path.realpath(path)
    if inputs:
        refuse_overlap(path, inputs)
    check_output_dir(path, force)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    sweep_stale_staging(parent)
    with _interruptible() as guard:
        with guard.deferred():  # never a staging directory without its owner record
            staging = _make_staging(parent, f".{os.path.basename(path)}{PARTIAL}")
        try:
            yield staging
            _publish(staging, tool)
            check_output_dir(path, force)  # again: hours may have passed, and someone may have written there
            with guard.deferred():
                _replace_dir(staging, path, parent)
        except BaseException as e:
            with guard.deferred():  # a second signal must not cut the cleanup short
                shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(e, _Interrupted) and is_disk_full(e):
                raise _disk_full_error(path, e) from None
            raise


def _replace_dir(staging: str, path: str, parent: str) -> None:
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    # Move the old output aside (into a swept staging directory), then rename: ``path`` is never missing for long,
    # and a kill in between leaves the old output for the next sweep, not a half-deleted one.
    trash = _make_staging(parent, f".{os.path.basename(path)}{PARTIAL}replaced-")
    old = os.path.join(trash, "old")
    os.rename(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.rename(old, path)  # the old output stays where it was
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_output_files(paths: Sequence[str], force: bool = False, *, flag: str = "--output-prefix"):
    """Yield ``{path as given: temporary path}``; every temporary file becomes its final path only if the block completes.

    ``flag`` is the option the messages tell the user to change.

    The files share one directory (created if needed); existing ones are refused unless ``force`` (then replaced
    only at the end; nothing else in the directory is touched). Nothing is left behind on failure or SIGTERM/SIGINT.
    """
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists: choose another {flag} or pass --force to replace it")
    directories = [p for p in existing if os.path.isdir(p)]
    if directories:
        raise OutputExistsError(f"{directories[0]} is a directory, not a file this tool wrote: choose another "
                                f"{flag}")
    parents = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(parents) != 1:
        raise ValueError(f"atomic_output_files writes into one directory, got {sorted(parents)}")
    parent = parents.pop()
    os.makedirs(parent, exist_ok=True)
    sweep_stale_staging(parent)
    with _interruptible() as guard:
        with guard.deferred():
            staging = _make_staging(parent, PARTIAL)
        try:
            staged: dict[str, str] = {p: os.path.join(staging, os.path.basename(p)) for p in paths}
            yield staged
            umask = _umask()
            with guard.deferred():
                for final, temporary in staged.items():
                    _as_if_created_normally(temporary, umask)
                    os.replace(temporary, final)
        except BaseException as e:
            if not isinstance(e, _Interrupted) and is_disk_full(e):
                raise _disk_full_error(os.path.abspath(paths[0]), e) from None
            raise
        finally:
            with guard.deferred():
                shutil.rmtree(staging, ignore_errors=True)
