"""megatron-harpe: Head-Adaptive Rotary Position Encoding (HARPE) for megatron-core.

Every attention head (every query group under GQA) rotates queries and keys with its own RoPE base,
so one single-stage long-context run does what multi-stage ABF pipelines do in several
(Lian et al., "Breaking the Stage Barrier", COLING 2025, arXiv 2412.07171).

The names below are imported on first use (PEP 562), so that ``import megatron_harpe`` - which every tool's
``--help`` does - loads neither torch nor megatron.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "PAPER_LLAMA2_7B_BASES": "megatron_harpe.bases",
    "parse_bases": "megatron_harpe.bases",
    "select_bases": "megatron_harpe.bases",
    "HarpeGPTModel": "megatron_harpe.model",
    "HarpeHybridModel": "megatron_harpe.model",
    "harpe_hybrid_stack_spec": "megatron_harpe.model",
    "harpe_layer_spec": "megatron_harpe.model",
    "HarpeRotaryEmbedding": "megatron_harpe.rotary",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
