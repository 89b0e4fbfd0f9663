#!/usr/bin/env python
"""harpe-compare-methods (megatron_harpe.compare.cli:compare_methods), as a script for Megatron-LM habits:
HARPE against ABF (single- and multi-stage), PI and YaRN at equal token budgets, trained and evaluated end to end.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.compare imports anything heavy
    from megatron_harpe.compare.cli import compare_methods

    sys.exit(compare_methods())
