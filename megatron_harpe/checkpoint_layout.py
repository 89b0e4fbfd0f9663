"""Megatron-LM checkpoints on disk: where things are, which format, and the args saved with them.

A checkpoint root holds megatron's tracker file (the latest iteration, or ``release``) and one directory per saved
iteration (``iter_0000020``, ``release``): a ``torch_dist`` checkpoint (``metadata.json``, ``.distcp`` files), or
one ``model_optim_rng.pt`` per (tensor, pipeline) rank. Every name comes from megatron's own
``get_checkpoint_name`` / ``get_checkpoint_tracker_filename``, for files read and written alike.

The saved ``args`` carry the model shape and the HARPE bases (:mod:`megatron_harpe.arguments`). Nothing from a
checkpoint runs code without ``allow_pickle``: ``torch`` files load with ``weights_only=True`` and megatron-core's
safe globals (what Megatron's own loader allows: Namespace, its enums, numpy rng state), and a ``torch_dist``
checkpoint is refused outright, because torch.distributed.checkpoint's ``FileSystemReader.read_metadata`` reads its
``.metadata`` with a plain ``pickle.load`` (torch 2.14, filesystem.py:938).
"""

from __future__ import annotations

import argparse
import errno
import glob
import os
import pickle

from megatron_harpe.command import RunError

RANK_FILE = "model_optim_rng.pt"


class CheckpointError(RunError, ValueError):
    """A directory that is not a readable Megatron checkpoint."""


class UnsafeCheckpointError(RunError, ValueError):
    """Reading the checkpoint would unpickle arbitrary objects; it needs ``allow_pickle`` (``--allow-pickle``)."""


# --- names ------------------------------------------------------------------------------------------------------

def tracker_file(root: str) -> str:
    from megatron.training.checkpointing import get_checkpoint_tracker_filename

    return get_checkpoint_tracker_filename(root)


def write_release_tracker(root: str) -> None:
    """Point the tracker at ``release``: what converted checkpoints are (train with ``--finetune``)."""
    with open(tracker_file(root), "w") as f:
        f.write("release")


def rank_file(root: str, tp_rank: int, pp_rank: int, pp: int, iteration: int | None = None) -> str:
    """``root/<iteration dir>/mp_rank_TT[_PPP]/model_optim_rng.pt``; ``iteration`` None is ``release``."""
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(root, iteration or 0, release=iteration is None, pipeline_parallel=pp > 1,
                               tensor_rank=tp_rank, pipeline_rank=pp_rank, expert_parallel=False)


def release_dir(root: str) -> str:
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(root, 0, release=True, return_base_dir=True)


def iteration_dir(root: str, iteration: int | None = None) -> str:
    """The directory of ``iteration`` (default: the tracker file's latest, which may be ``release``)."""
    from megatron.training.checkpointing import get_checkpoint_name

    release = False
    if iteration is None:
        tracker = tracker_file(root)
        if not os.path.isfile(tracker):
            raise CheckpointError(f"{root} has no {os.path.basename(tracker)}: not a Megatron checkpoint directory "
                                  "(or pass an iteration)")
        text = open(tracker).read().strip()
        release = text == "release"
        if not release and not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
        iteration = 0 if release else int(text)
    path = get_checkpoint_name(root, iteration, release=release, return_base_dir=True)
    if not release and not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist: the checkpoint for iteration {iteration} is missing")
    return path


def _rank_files_found(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "mp_rank_*", RANK_FILE)))


def checkpoint_format(path: str) -> str:
    """``torch_dist`` or ``torch``, for an iteration directory."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if _rank_files_found(path):
        return "torch"
    raise CheckpointError(f"{path} holds neither a torch_dist checkpoint (metadata.json) nor a torch one "
                          f"(mp_rank_*/{RANK_FILE})")


def torch_rank_files(path: str, tp: int, pp: int) -> dict[tuple[int, int], str]:
    """``{(tp_rank, pp_rank): file}`` of a ``torch`` iteration directory saved at TP=``tp`` PP=``pp``, all present."""
    root, directory = os.path.split(os.path.normpath(path))
    iteration = None if directory == "release" else int(directory[len("iter_"):])
    files = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            file = rank_file(root, tp_rank, pp_rank, pp, iteration)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is missing: the checkpoint was saved at TP={tp} PP={pp} and needs "
                                      "every rank's file")
            files[tp_rank, pp_rank] = file
    found = len(_rank_files_found(path))
    if found != tp * pp:
        raise CheckpointError(f"{path} holds {found} rank files, its args say TP={tp} x PP={pp}")
    return files


# --- reading ----------------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _damaged(file: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{file} is damaged or truncated ({_first_line(e)}): re-copy the checkpoint from where it "
                           "was saved")


# torch's zip reader and both unpicklers, on a cut or overwritten file
_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError)


def _is_damage(e: BaseException) -> bool:
    """A read error of a cut or overwritten file; torch's zip reader (2.14) also raises EINVAL on some cut files,
    seeking by garbage offsets (other OSErrors are the disk's, and pass)."""
    return isinstance(e, _READ_ERRORS) or (isinstance(e, OSError) and e.errno == errno.EINVAL)


def load_torch_file(file: str, allow_pickle: bool = False, map_location: str = "cpu", **kwargs):
    """``torch.load`` of a Megatron ``model_optim_rng.pt``: tensors and megatron's safe globals only, unless
    ``allow_pickle`` (then a file that needs more is unpickled in full). A damaged file is one clear error.
    ``map_location="meta"``: the structure alone, each tensor's storage carrying its byte offset in the file
    (``untyped_storage()._checkpoint_offset``); no tensor bytes are read."""
    import torch

    import megatron.core  # noqa: F401  registers megatron.core.safe_globals with torch (Namespace, enums, rng state)

    try:
        return torch.load(file, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # Refused globals (a __reduce__ payload, a class torch does not know) vs a damaged stream.
        if "GLOBAL" not in str(e) and "allowlisted" not in str(e):
            raise _damaged(file, e) from None
        refusal = next(line for line in str(e).splitlines() if "GLOBAL" in line or "allowlisted" in line)
        refusal = refusal.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "").strip()
    except (*_READ_ERRORS, OSError) as e:
        if not _is_damage(e):
            raise
        raise _damaged(file, e) from None
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{file} holds objects beyond tensors and Megatron's own types ({refusal[:200]}): "
                                    "loading it would unpickle them, which runs any code they carry; pass "
                                    "--allow-pickle only if you trust it")
    try:
        return torch.load(file, map_location=map_location, weights_only=False, **kwargs)
    except (*_READ_ERRORS, OSError) as e:
        if not _is_damage(e):
            raise
        raise _damaged(file, e) from None


def require_pickle_opt_in(path: str, allow_pickle: bool) -> None:
    """Refuse to read a ``torch_dist`` checkpoint without ``allow_pickle`` (its ``.metadata`` is a pickle)."""
    if not allow_pickle:
        raise UnsafeCheckpointError(f"torch_dist metadata is a pickle (torch.distributed.checkpoint unpickles "
                                    f"{os.path.join(path, '.metadata')} without restriction, which runs any code in "
                                    f"it); pass --allow-pickle if you trust {path}")


def check_torch_dist_files(path: str) -> None:
    """Name a truncated or missing ``.distcp`` file before torch's reader fails with ``EOFError: Ran out of input``.

    Reads the ``.metadata`` pickle: call only after :func:`require_pickle_opt_in`.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # an unpickling error of any kind: the file is cut or overwritten
        raise CheckpointError(f"{os.path.join(path, '.metadata')} is damaged or truncated ({_first_line(e)}): "
                              "re-copy the checkpoint from where it was saved") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (the checkpoint's .metadata lists it): re-copy the whole "
                                  "checkpoint directory")
        actual = os.path.getsize(file)
        if actual < size:
            raise CheckpointError(f"{file} is truncated ({actual} of at least {size} bytes): the checkpoint is "
                                  "damaged, re-copy it from where it was saved")


def _is_cut(e: BaseException) -> bool:
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException: each rank's error
    if isinstance(failures, dict):
        return any(_is_cut(f[0] if isinstance(f, tuple) else f) for f in failures.values())
    return isinstance(e, (EOFError, pickle.UnpicklingError)) or "Ran out of input" in str(e)


def load_torch_dist(sharded_state_dict: dict, path: str, allow_pickle: bool = False, **load_options) -> dict:
    """``dist_checkpointing.load`` behind the opt-in, with damaged files named; ``load_options`` go to it (a partial
    load: ``validate_access_integrity=False``; a shared ``sharded_strategy``)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    require_pickle_opt_in(path, allow_pickle)
    check_torch_dist_files(path)
    try:
        return dist_checkpointing.load(sharded_state_dict, path, **load_options)
    except (Exception, CheckpointException) as e:  # torch's reader: EOFError/RuntimeError (wrapped) for cut files
        if _is_cut(e) or "PytorchStreamReader" in str(e):
            raise CheckpointError(f"{path} is damaged ({_first_line(e)}): re-copy the checkpoint from where it was "
                                  "saved") from None
        raise


def common_state(path: str, fmt: str, allow_pickle: bool = False, weights: bool = True) -> dict:
    """The non-sharded state (args, iteration, ...); for ``torch`` format the whole rank-0 shard, weights included
    (``weights`` False: as meta tensors, no bytes read)."""
    if fmt == "torch_dist":
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        if not os.path.isfile(os.path.join(path, "common.pt")):  # the legacy common.pt loads weights_only
            require_pickle_opt_in(path, allow_pickle)
            check_torch_dist_files(path)
        try:
            common = dist_checkpointing.load_common_state_dict(path)
        except (Exception, CheckpointException) as e:
            if _is_cut(e):
                raise CheckpointError(f"{path} is damaged ({_first_line(e)}): re-copy the checkpoint from where it "
                                      "was saved") from None
            raise
    else:
        common = load_torch_file(_rank_files_found(path)[0], allow_pickle, "cpu" if weights else "meta")
    if "args" not in common:
        raise CheckpointError(f"{path} carries no saved args; it was not written by Megatron-LM's checkpointing")
    return common


def load_checkpoint_args(root: str, iteration: int | None = None, *,
                         allow_pickle: bool = False) -> argparse.Namespace:
    """The Megatron ``args`` saved with the checkpoint (model shape, parallel sizes, ``harpe_bases``).

    ``torch_dist`` needs ``allow_pickle`` (:class:`UnsafeCheckpointError` otherwise): see the module docstring.
    """
    path = iteration_dir(root, iteration)
    return common_state(path, checkpoint_format(path), allow_pickle, weights=False)["args"]


def read_checkpoint(root: str, iteration: int | None = None,
                    allow_pickle: bool = False) -> tuple[str, str, argparse.Namespace]:
    """``(iteration directory, format, saved args)`` of a Megatron-LM checkpoint (torch_dist needs ``allow_pickle``)."""
    path = iteration_dir(root, iteration)
    fmt = checkpoint_format(path)
    return path, fmt, common_state(path, fmt, allow_pickle, weights=False)["args"]
