"""Run megatron-core's CUDA-assuming bookkeeping code on a CPU.

megatron-core's pipeline schedules and p2p communication allocate small bookkeeping tensors with
``device="cuda"`` / ``torch.cuda.current_device()`` and call ``torch.cuda.synchronize()``; activation
recompute saves and restores the CUDA RNG state; inference contexts allocate their KV cache on the
current CUDA device. Inside :func:`megatron_on_cpu` those requests land on the CPU (or do nothing), so
``get_forward_backward_func()``, recompute and KV-cache decoding run unchanged.
It is a no-op where CUDA is available.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextmanager
def megatron_on_cpu():
    """Redirect megatron-core's CUDA bookkeeping allocations to the CPU for the duration."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel import random as megatron_random

    patches = [
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        # There is no CUDA RNG to save; the CPU RNG is saved and restored by megatron itself.
        (megatron_random, "_get_cuda_rng_state", lambda *a, **k: None),
        (megatron_random, "_set_cuda_rng_state", lambda *a, **k: None),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        with _CudaToCpu():
            yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
