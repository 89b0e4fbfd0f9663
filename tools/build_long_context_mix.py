#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.mixture: Fu et al.'s per-source length-upsampled long-context mixture."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.mixture imports anything heavy
    from megatron_harpe.data.mixture import main

    sys.exit(main())
