#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.synthetic: offline per-source corpora and a tiny sentencepiece model."""
import sys

from megatron_harpe.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
