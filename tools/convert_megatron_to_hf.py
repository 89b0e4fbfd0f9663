#!/usr/bin/env python
"""Command-line front for megatron_harpe.convert.cli: Megatron-LM checkpoint -> Hugging Face."""
import sys

from megatron_harpe.convert.cli import megatron_to_hf

if __name__ == "__main__":
    sys.exit(megatron_to_hf())
