#!/usr/bin/env python
"""harpe-eval-perplexity (megatron_harpe.eval.cli:eval_perplexity), as a script for Megatron-LM habits:
perplexity evaluation of a Hugging Face model directory.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.eval.cli imports anything heavy
    from megatron_harpe.eval.cli import eval_perplexity

    sys.exit(eval_perplexity())
