#!/usr/bin/env python
"""harpe-eval-niah (megatron_harpe.eval.cli:eval_niah), as a script for Megatron-LM habits:
Needle-in-a-Haystack heatmap of a Hugging Face model directory.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.eval.cli imports anything heavy
    from megatron_harpe.eval.cli import eval_niah

    sys.exit(eval_niah())
