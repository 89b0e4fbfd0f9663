#!/usr/bin/env python
"""harpe-demo (megatron_harpe.cli:demo), as a script for Megatron-LM habits: the embedded-default demonstration."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.cli imports anything heavy
    from megatron_harpe.cli import demo

    sys.exit(demo())
