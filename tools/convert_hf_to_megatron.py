#!/usr/bin/env python
"""Command-line front for megatron_harpe.convert.cli: Hugging Face Llama-2 -> Megatron-LM checkpoint."""
import sys

from megatron_harpe.convert.cli import hf_to_megatron

if __name__ == "__main__":
    sys.exit(hf_to_megatron())
