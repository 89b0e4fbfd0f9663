#!/usr/bin/env python
"""Command-line front for megatron_harpe.convert.cli: Megatron-LM checkpoint -> another TP/PP layout."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.convert.cli imports anything heavy
    from megatron_harpe.convert.cli import reshard

    sys.exit(reshard())
