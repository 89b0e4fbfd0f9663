#!/usr/bin/env python
"""Command-line front for megatron_harpe.eval.cli: two NIAH results side by side and their difference."""
import sys

from megatron_harpe.eval.cli import compare_niah

if __name__ == "__main__":
    sys.exit(compare_niah())
