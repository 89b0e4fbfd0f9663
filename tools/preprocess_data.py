#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.preprocess: JSONL/plain text -> Megatron .bin/.idx (Megatron-LM's flags)."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.preprocess imports anything heavy
    from megatron_harpe.data.preprocess import main

    sys.exit(main())
