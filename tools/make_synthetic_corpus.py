#!/usr/bin/env python
"""Command-line front for megatron_harpe.data.synthetic: offline per-source corpora and a tiny sentencepiece model."""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.synthetic imports anything heavy
    from megatron_harpe.data.synthetic import main

    sys.exit(main())
