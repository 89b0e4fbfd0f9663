"""Bytes the autograd graph keeps for backward: the number HARPE's kernels exist to keep small.

Counted through ``torch.autograd.graph.saved_tensors_hooks``, once per storage: a view saved twice, or two
views of one buffer (q and k sliced from the fused QKV output), keep that buffer alive once, whole. The
tests, the memory planner's tests and ``benchmarks/rope.py`` all measure with this one rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes that ``fn(*args, **kwargs)`` saves for backward, each storage counted once and whole."""
    storages: dict[tuple[torch.device, int], int] = {}  # by (device, address): a storage freed and reused counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[t.device, storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())
