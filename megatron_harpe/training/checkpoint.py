"""Read Megatron-LM checkpoints (``torch_dist`` or ``torch``) written by either engine, outside the trainer.

The saved ``args`` carry the model shape and the HARPE bases (:mod:`megatron_harpe.arguments`), so a
checkpoint rebuilds the model it was trained as, at any tensor-parallel size for ``torch_dist``
(dist_checkpointing reshards on load).

Nothing from a checkpoint runs code without ``allow_pickle``: ``torch`` files load with ``weights_only=True`` and
megatron-core's safe globals (what Megatron's own loader allows: Namespace, its enums, numpy rng state), and a
``torch_dist`` checkpoint is refused outright, because torch.distributed.checkpoint's ``FileSystemReader.
read_metadata`` reads its ``.metadata`` with a plain ``pickle.load`` (torch 2.14, filesystem.py:938).
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
from typing import Dict, Optional

import torch

from megatron.core import dist_checkpointing, parallel_state

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.model import have_te
from megatron_harpe.training.model_provider import build_model

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A directory that is not a readable Megatron checkpoint."""


class UnsafeCheckpointError(ValueError):
    """Reading the checkpoint would unpickle arbitrary objects; it needs ``allow_pickle`` (``--allow-pickle``)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _damaged(file: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{file} is damaged or truncated ({_first_line(e)}): re-copy the checkpoint from where it "
                           "was saved")


# torch's zip reader and both unpicklers, on a cut or overwritten file
_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError)


def load_torch_file(file: str, allow_pickle: bool = False, **kwargs):
    """``torch.load`` of a Megatron ``model_optim_rng.pt``: tensors and megatron's safe globals only, unless
    ``allow_pickle`` (then a file that needs more is unpickled in full). A damaged file is one clear error."""
    import megatron.core  # noqa: F401  registers megatron.core.safe_globals with torch (Namespace, enums, rng state)

    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # Refused globals (a __reduce__ payload, a class torch does not know) vs a damaged stream.
        if "GLOBAL" not in str(e) and "allowlisted" not in str(e):
            raise _damaged(file, e) from None
        refusal = next(line for line in str(e).splitlines() if "GLOBAL" in line or "allowlisted" in line)
        refusal = refusal.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "").strip()
    except _READ_ERRORS as e:
        raise _damaged(file, e) from None
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{file} holds objects beyond tensors and Megatron's own types ({refusal[:200]}): "
                                    "loading it would unpickle them, which runs any code they carry; pass "
                                    "--allow-pickle only if you trust it")
    try:
        return torch.load(file, map_location="cpu", weights_only=False, **kwargs)
    except _READ_ERRORS as e:
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
    needed: Dict[str, int] = {}
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


def load_torch_dist(sharded_state_dict: dict, path: str, allow_pickle: bool = False) -> dict:
    """``dist_checkpointing.load`` behind the opt-in, with damaged files named."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    require_pickle_opt_in(path, allow_pickle)
    check_torch_dist_files(path)
    try:
        return dist_checkpointing.load(sharded_state_dict, path)
    except (Exception, CheckpointException) as e:  # torch's reader: EOFError/RuntimeError (wrapped) for cut files
        if isinstance(e, (EOFError, pickle.UnpicklingError)) or "Ran out of input" in str(e) or \
                "PytorchStreamReader" in str(e):
            raise CheckpointError(f"{path} is damaged ({_first_line(e)}): re-copy the checkpoint from where it was "
                                  "saved") from None
        raise


def iteration_dir(root: str, iteration: Optional[int] = None) -> str:
    """``root/iter_XXXXXXX`` for ``iteration`` (default: the tracker file's latest)."""
    if iteration is None:
        tracker = os.path.join(root, TRACKER)
        if not os.path.isfile(tracker):
            raise CheckpointError(f"{root} has no {TRACKER}: not a Megatron checkpoint directory (or pass an iteration)")
        text = open(tracker).read().strip()
        if text == "release":
            return os.path.join(root, "release")
        if not text.isdigit():
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
        iteration = int(text)
    path = os.path.join(root, f"iter_{iteration:07d}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist: the checkpoint for iteration {iteration} is missing")
    return path


def checkpoint_format(path: str) -> str:
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if glob.glob(os.path.join(path, "mp_rank_*", "model_optim_rng.pt")):
        return "torch"
    raise CheckpointError(f"{path} holds neither a torch_dist checkpoint (metadata.json) nor a torch one "
                          "(mp_rank_*/model_optim_rng.pt)")


def _torch_shard_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "mp_rank_*", "model_optim_rng.pt")))


def _common_state(path: str, fmt: str, allow_pickle: bool = False) -> dict:
    """The non-sharded state (args, iteration, ...); for ``torch`` format the whole rank-0 shard, weights included."""
    if fmt == "torch_dist":
        if not os.path.isfile(os.path.join(path, "common.pt")):  # the legacy common.pt loads weights_only
            require_pickle_opt_in(path, allow_pickle)
            check_torch_dist_files(path)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            common = dist_checkpointing.load_common_state_dict(path)
        except (Exception, CheckpointException) as e:
            if isinstance(e, (EOFError, pickle.UnpicklingError)) or "Ran out of input" in str(e):
                raise CheckpointError(f"{path} is damaged ({_first_line(e)}): re-copy the checkpoint from where it "
                                      "was saved") from None
            raise
    else:
        common = load_torch_file(_torch_shard_files(path)[0], allow_pickle)
    if "args" not in common:
        raise CheckpointError(f"{path} carries no saved args; it was not written by Megatron-LM's checkpointing")
    return common


def load_checkpoint_args(root: str, iteration: Optional[int] = None, *,
                         allow_pickle: bool = False) -> argparse.Namespace:
    """The Megatron ``args`` saved with the checkpoint (model shape, parallel sizes, ``harpe_bases``).

    ``torch_dist`` needs ``allow_pickle`` (:class:`UnsafeCheckpointError` otherwise): see the module docstring.
    """
    path = iteration_dir(root, iteration)
    return _common_state(path, checkpoint_format(path), allow_pickle)["args"]


def load_model(root: str, iteration: Optional[int] = None, *, rope_impl: Optional[str] = None,
               allow_pickle: bool = False):
    """Rebuild the trained model (HARPE or standard RoPE) on this process's parallel layout and load its weights.

    Needs megatron's ``parallel_state`` initialised; for ``torch_dist`` any TP/PP works (one rank: TP=PP=1), and
    ``allow_pickle``. Returns ``(model, args)``; the model is in eval mode, fp32 on the CPU.
    """
    path = iteration_dir(root, iteration)
    fmt = checkpoint_format(path)
    common = _common_state(path, fmt, allow_pickle)
    args = argparse.Namespace(**vars(common["args"]))
    args.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    args.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    args.context_parallel_size = parallel_state.get_context_parallel_world_size()
    if rope_impl is not None:
        args.harpe_rope_impl = rope_impl
    if not torch.cuda.is_available():
        from megatron_harpe.training.compact import prepare_args_for_cpu

        prepare_args_for_cpu(args)
    elif not have_te():  # reading weights, not training: the local spec has the same parameters and keys
        args.transformer_impl = "local"
    args.bf16 = args.fp16 = False
    args.params_dtype = torch.float32
    with megatron_on_cpu():
        model = build_model(args, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
        if fmt == "torch_dist":
            state = load_torch_dist({"model": model.sharded_state_dict()}, path, allow_pickle)["model"]
        else:
            if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
                raise CheckpointError("torch-format checkpoints load at the layout they were saved with; "
                                      "reshard with tools/reshard_megatron.py --tp 1 --pp 1, or save with --ckpt-format torch_dist")
            state = common["model"]  # the rank-0 shard read above holds the weights
        result = model.load_state_dict(state, strict=False)
    # Transformer Engine's _extra_state entries may legitimately differ; every weight must be there.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model its args describe: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), args
