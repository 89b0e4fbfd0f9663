#!/usr/bin/env python
"""Command-line front for megatron_harpe.planning.cli: which TP/PP/CP/DP and recompute settings fit, best first."""
import sys

from megatron_harpe.planning.cli import main

if __name__ == "__main__":
    sys.exit(main())
