#!/usr/bin/env python
"""harpe-convert-hf-to-megatron (megatron_harpe.convert.cli:hf_to_megatron), as a script for Megatron-LM habits:
Hugging Face Llama-2 -> Megatron-LM checkpoint.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.convert.cli imports anything heavy
    from megatron_harpe.convert.cli import hf_to_megatron

    sys.exit(hf_to_megatron())
