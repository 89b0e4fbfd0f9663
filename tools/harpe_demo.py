#!/usr/bin/env python
"""Command-line front for megatron_harpe.demo (the embedded-default demonstration)."""
import sys

from megatron_harpe.demo import main

if __name__ == "__main__":
    sys.exit(main())
