"""Run megatron-core's CUDA-assuming bookkeeping code on a CPU.

megatron-core's pipeline schedules and p2p communication allocate small bookkeeping tensors with
``device="cuda"`` / ``torch.cuda.current_device()`` and call ``torch.cuda.synchronize()``; activation
recompute saves and restores the CUDA RNG state; inference contexts allocate their KV cache on the
current CUDA device; DDP's gradient buffers wait on the current CUDA stream; the optimizer asserts
``grad.type() == 'torch.cuda.FloatTensor'``; megatron.training's checkpoints save the CUDA RNG state.
Inside :func:`megatron_on_cpu` those requests land on the CPU (or do nothing), so
``get_forward_backward_func()``, recompute, KV-cache decoding, megatron-core's DDP and optimizers and
megatron.training's checkpointing run unchanged. It is a no-op where CUDA is available.
:func:`prepare_args_for_cpu` is the same for Megatron's parsed flags: what their CUDA defaults turn on, off.
"""

from __future__ import annotations

import argparse
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
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer checks type names such as 'torch.cuda.FloatTensor'
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for the current CUDA stream: on a CPU every operation is already ordered."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


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
        (torch.cuda, "current_stream", lambda *a, **k: _NullStream()),
        # megatron.training's checkpoints carry a CUDA RNG state; an empty one stands in for it.
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8)),
        (torch.cuda, "set_rng_state", lambda *a, **k: None),
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


def prepare_args_for_cpu(args: argparse.Namespace) -> None:
    """CPU settings for flags whose Megatron defaults assume CUDA (fusions, initialisation, backend, layer spec)."""
    args.use_cpu_initialization = True
    args.distributed_backend = "gloo"
    for flag in ("gradient_accumulation_fusion", "bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion",
                 "masked_softmax_fusion", "apply_rope_fusion", "cross_entropy_loss_fusion"):
        setattr(args, flag, False)
    args.no_persist_layer_norm = True
    args.transformer_impl = "local"
