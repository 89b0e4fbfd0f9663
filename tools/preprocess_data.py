#!/usr/bin/env python
"""harpe-preprocess-data (megatron_harpe.data.cli:preprocess_data), as a script for Megatron-LM habits:
JSONL/plain text -> Megatron .bin/.idx (Megatron-LM's flags).
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.cli imports anything heavy
    from megatron_harpe.data.cli import preprocess_data

    sys.exit(preprocess_data())
