#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.preprocess: JSONL/plain text -> Megatron .bin/.idx (Megatron-LM's flags)."""
import sys

from megatron_harpe.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
