#!/usr/bin/env python
"""Command-line front for megatron_harpe.bases_cli: choose HARPE bases and draw their waveforms."""
import sys

from megatron_harpe.bases_cli import main

if __name__ == "__main__":
    sys.exit(main())
