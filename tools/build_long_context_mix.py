#!/usr/bin/env python
"""harpe-build-long-context-mix (megatron_harpe.data.cli:build_long_context_mix), as a script for Megatron-LM habits:
Fu et al.'s per-source length-upsampled long-context mixture.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.cli imports anything heavy
    from megatron_harpe.data.cli import build_long_context_mix

    sys.exit(build_long_context_mix())
