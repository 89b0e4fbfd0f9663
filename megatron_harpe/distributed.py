"""Process-group set-up for running megatron-core on CPUs over gloo (tests, demos, the compact loop)."""

from __future__ import annotations

import os
import socket
from typing import Callable

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
