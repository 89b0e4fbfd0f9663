#!/usr/bin/env python
"""Command-line front for megatron_harpe.eval.cli: perplexity evaluation of a Hugging Face model directory."""
import sys

from megatron_harpe.eval.cli import eval_perplexity

if __name__ == "__main__":
    sys.exit(eval_perplexity())
