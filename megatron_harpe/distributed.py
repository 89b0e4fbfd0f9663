"""Process groups for megatron-core: torchrun's job, a world of one (conversion, reading a checkpoint), gloo ranks
spawned on one machine (tests, demos)."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int) -> None:
    """gloo on loopback."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1) -> None:
    """(Re)initialize megatron's parallel_state for these sizes over the existing process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )


def init_from_environment(args: argparse.Namespace) -> None:
    """The job's process group and megatron's parallel state from parsed flags: torchrun's environment when
    present, else one process on a free loopback port. Nothing when a process group exists."""
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=args.distributed_backend, rank=args.rank, world_size=args.world_size,
        timeout=timedelta(minutes=args.distributed_timeout_minutes))
    init_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.context_parallel_size)


@contextmanager
def single_process_world() -> Iterator[None]:
    """A gloo world of this one process with megatron's parallel state at TP=PP=CP=1, unless the caller has them
    already; what was made here is torn down afterwards."""
    from megatron.core import parallel_state

    own_world = not torch.distributed.is_initialized()
    if own_world:
        init_process_group(0, 1, free_port())
    own_parallel_state = not parallel_state.model_parallel_is_initialized()
    if own_parallel_state:
        init_model_parallel(1, 1, 1)
    try:
        yield
    finally:
        if own_parallel_state:
            parallel_state.destroy_model_parallel()
        if own_world:
            torch.distributed.destroy_process_group()


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    # A spawned rank starts with the default warning filters: the entry points' filter first, then megatron (its
    # import-time notices are what the filter drops).
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()
    from megatron.core import parallel_state

    init_process_group(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raises a rank's failure."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
