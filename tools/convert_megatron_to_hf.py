#!/usr/bin/env python
"""harpe-convert-megatron-to-hf (megatron_harpe.convert.cli:megatron_to_hf), as a script for Megatron-LM habits:
Megatron-LM checkpoint -> Hugging Face.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.convert.cli imports anything heavy
    from megatron_harpe.convert.cli import megatron_to_hf

    sys.exit(megatron_to_hf())
