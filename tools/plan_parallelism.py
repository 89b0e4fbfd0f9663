#!/usr/bin/env python
"""Command-line front for megatron_harpe.planning.cli: which TP/PP/CP/DP and recompute settings fit, best first."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.planning.cli imports anything heavy
    from megatron_harpe.planning.cli import main

    sys.exit(main())
