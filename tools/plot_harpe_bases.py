#!/usr/bin/env python
"""Command-line front for megatron_harpe.eval.cli: HARPE bases and their waveforms against single-base ABF."""
import sys

from megatron_harpe.eval.cli import plot_harpe_bases

if __name__ == "__main__":
    sys.exit(plot_harpe_bases())
