"""megatron-harpe: Head-Adaptive Rotary Position Encoding (HARPE) for megatron-core.

Every attention head (every query group under GQA) rotates queries and keys with its own RoPE base,
so one single-stage long-context run does what multi-stage ABF pipelines do in several
(Lian et al., "Breaking the Stage Barrier", COLING 2025, arXiv 2412.07171).
"""

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, parse_bases, select_bases
from megatron_harpe.model import HarpeGPTModel, HarpeHybridModel, harpe_hybrid_stack_spec, harpe_layer_spec
from megatron_harpe.rotary import HarpeRotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "PAPER_LLAMA2_7B_BASES",
    "HarpeGPTModel",
    "HarpeHybridModel",
    "HarpeRotaryEmbedding",
    "harpe_hybrid_stack_spec",
    "harpe_layer_spec",
    "parse_bases",
    "select_bases",
]
