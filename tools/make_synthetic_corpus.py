#!/usr/bin/env python
"""harpe-make-synthetic-corpus (megatron_harpe.data.cli:make_synthetic_corpus), as a script for Megatron-LM habits:
offline per-source corpora and a tiny sentencepiece model.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.data.cli imports anything heavy
    from megatron_harpe.data.cli import make_synthetic_corpus

    sys.exit(make_synthetic_corpus())
