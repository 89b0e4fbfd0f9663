"""Warnings our users cannot act on, filtered once at each entry point (tools/*.py, console scripts, pretraining).

Each rule names the exact message and the module (or logger) that issues it; anything else - a new warning, the same
text from another module - is still shown. Call :func:`filter_unactionable_warnings` before the heavy imports
(megatron, torch): most of these fire at import time. Importing this module imports neither.
"""

from __future__ import annotations

import glob
import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Unactionable:
    message: str  # regex, matched at the start of the message
    source: str  # regex on the issuing module (warnings) or the exact logger name (logging)
    why: str
    cpu_only: bool = False  # on a GPU machine the notice says what to install, so it stays
    logged: bool = False  # a logging record rather than a warnings.warn


RULES = (
    Unactionable(r"Transformer Engine and Apex are not installed\. Falling back to ",
                 r"megatron\.(core\.(optimizer|distributed\.fsdp)|training\.utils)\b",
                 "optional GPU packages; a CPU has nothing to install", cpu_only=True),
    Unactionable(r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.models\b",
                 "optional GPU package; a CPU has nothing to install", cpu_only=True),
    Unactionable(r"Only transformer-engine>=\S+ supports MoE experts, but your version is 0\.0\.0\.",
                 r"megatron\.core\.extensions\.transformer_engine_spec_provider",
                 "no Transformer Engine on a CPU, and HARPE models have no MoE experts", cpu_only=True),
    Unactionable(r"No CUDA runtime is found, using CUDA_HOME=", "torch.utils.cpp_extension",
                 "torch's C++-extension helper, imported by megatron, on a machine without CUDA", cpu_only=True,
                 logged=True),
    Unactionable(r"When using async grad allreduce it is recommended to set the environment variable "
                 r"CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core\.tensor_parallel\.layers",
                 "a CUDA stream setting; on a CPU there is no stream to configure", cpu_only=True),
    Unactionable(r"absl\.logging is not installed\. Using logging\.getLogger", r"megatron\.core\.hyper_comm_grid",
                 "megatron's optional logging backend; it falls back to logging"),
    Unactionable(r"The following imports from `dynamic_context\.py` will be removed",
                 r"megatron\.core\.inference\.contexts", "megatron importing its own module"),
    Unactionable(r"full scope is deprecated\. Use empty cuda_graph_modules",
                 r"megatron\.core\.transformer\.transformer_config",
                 "megatron's own default (cuda_graph_modules='full') warns on every TransformerConfig"),
    Unactionable(r"GPTModel IS DEPRECATED\.", "megatron.core.models.gpt.gpt_model",
                 "HARPE pretraining builds GPTModel on purpose (its checkpoints and recipes); nothing to change",
                 logged=True),
)


def has_nvidia_gpu() -> bool:
    """An NVIDIA device node exists (checked without importing torch, which --help must not)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def _drop_log_records(logger_name: str, pattern: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
        logger.addFilter(_DropMessage(pattern))


def filter_unactionable_warnings(gpu: bool | None = None) -> None:
    """Hide the warnings of :data:`RULES` (idempotent). ``gpu``: whether this machine has one (default: probe it)."""
    gpu = has_nvidia_gpu() if gpu is None else gpu
    for rule in RULES:
        if rule.cpu_only and gpu:
            continue
        if rule.logged:
            _drop_log_records(rule.source, rule.message)
        else:
            warnings.filterwarnings("ignore", message=rule.message, module=rule.source)
