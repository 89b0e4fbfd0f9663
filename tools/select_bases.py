#!/usr/bin/env python
"""harpe-select-bases (megatron_harpe.cli:select_bases), as a script for Megatron-LM habits:
choose HARPE bases and draw their waveforms.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.cli imports anything heavy
    from megatron_harpe.cli import select_bases

    sys.exit(select_bases())
