#!/usr/bin/env python
"""harpe-compare-niah (megatron_harpe.eval.cli:compare_niah), as a script for Megatron-LM habits:
two NIAH results side by side and their difference.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.eval.cli imports anything heavy
    from megatron_harpe.eval.cli import compare_niah

    sys.exit(compare_niah())
