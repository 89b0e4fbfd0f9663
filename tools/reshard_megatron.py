#!/usr/bin/env python
"""harpe-reshard-megatron (megatron_harpe.convert.cli:reshard), as a script for Megatron-LM habits:
Megatron-LM checkpoint -> another TP/PP layout.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.convert.cli imports anything heavy
    from megatron_harpe.convert.cli import reshard

    sys.exit(reshard())
