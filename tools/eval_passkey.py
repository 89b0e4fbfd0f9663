#!/usr/bin/env python
"""harpe-eval-passkey (megatron_harpe.eval.cli:eval_passkey), as a script for Megatron-LM habits:
passkey evaluation of a Hugging Face model directory.
"""
import sys

if __name__ == "__main__":
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # before megatron_harpe.eval.cli imports anything heavy
    from megatron_harpe.eval.cli import eval_passkey

    sys.exit(eval_passkey())
