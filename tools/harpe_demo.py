#!/usr/bin/env python
"""Command-line front for megatron_harpe.demo (the embedded-default demonstration)."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.demo imports anything heavy
    from megatron_harpe.demo import main

    sys.exit(main())
