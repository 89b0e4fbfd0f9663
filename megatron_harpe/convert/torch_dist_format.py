"""Megatron-core's ``torch_dist`` checkpoint format (``dist_checkpointing``): layout-free, any TP/PP loads it.

Written from a TP=1 model built in this process and read back into one, so both directions hold the whole model.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator

import torch

from megatron_harpe.checkpoint_layout import load_torch_dist, release_dir, require_pickle_opt_in, write_release_tracker
from megatron_harpe.checkpoint_model import single_rank_model
from megatron_harpe.convert.mapping import full_megatron_state
from megatron_harpe.shape import LlamaShape


def write_torch_dist(root: str, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, args: argparse.Namespace,
                     dtype: torch.dtype) -> None:
    """A layout-free ``torch_dist`` checkpoint, saved by megatron-core from a TP=1 model built here."""
    from megatron.core import dist_checkpointing

    from megatron_harpe.sharding import load_full_state_dict

    full = {k: v.to(dtype) for k, v in full_megatron_state(read_hf, shape, args.padded_vocab_size).items()}
    with single_rank_model(args, dtype) as model:
        load_full_state_dict(model, full, 0, 1, gated_linear_unit=True)
        del full
        path = release_dir(root)
        os.makedirs(path, exist_ok=True)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model.sharded_state_dict()}
        with _writer_errors(path):
            dist_checkpointing.save(state, path)
    write_release_tracker(root)


class _ErrorLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _writer_errors(path: str):
    """Keep the cause of a failed torch_dist write. megatron-core's file writer turns a worker's OSError into an
    assertion on its type (filesystem_async.py ``check_local_output``), keeping the errno only in a log line."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    lines = _ErrorLines()
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    logger.addHandler(lines)
    try:
        yield
    except (Exception, CheckpointException) as e:
        for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")):
            if any(text in line or f"[Errno {code}]" in line for line in lines.lines):
                raise OSError(code, os.strerror(code), path) from e
        raise
    finally:
        logger.removeHandler(lines)


def read_torch_dist(path: str, args: argparse.Namespace, dtype: torch.dtype,
                    allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)``, loaded into a TP=1 model (the whole model in memory)."""
    require_pickle_opt_in(path, allow_pickle)
    with single_rank_model(args, dtype) as model:
        loaded = load_torch_dist({"model": model.sharded_state_dict()}, path, allow_pickle)["model"]
        model.load_state_dict(loaded, strict=False)
        for name, tensor in model.state_dict().items():
            if not name.endswith("_extra_state"):
                yield name, tensor
