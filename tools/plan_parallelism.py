#!/usr/bin/env python
"""harpe-plan-parallelism (megatron_harpe.planning.cli:main), as a script for Megatron-LM habits:
which TP/PP/CP/DP and recompute settings fit, best first.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.planning.cli imports anything heavy
    from megatron_harpe.planning.cli import main

    sys.exit(main())
