#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.mixture: Fu et al.'s per-source length-upsampled long-context mixture."""
import sys

from megatron_harpe.data.mixture import main

if __name__ == "__main__":
    sys.exit(main())
