#!/usr/bin/env python
"""Command-line front for megatron_harpe.convert.cli: Megatron-LM checkpoint -> another TP/PP layout."""
import sys

from megatron_harpe.convert.cli import reshard

if __name__ == "__main__":
    sys.exit(reshard())
