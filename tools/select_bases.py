#!/usr/bin/env python
"""Command-line front for megatron_harpe.bases_cli: choose HARPE bases and draw their waveforms."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.bases_cli imports anything heavy
    from megatron_harpe.bases_cli import main

    sys.exit(main())
