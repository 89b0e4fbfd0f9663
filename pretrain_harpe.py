#!/usr/bin/env python
"""Pretrain a Llama-style model with HARPE: the counterpart of Megatron-LM's ``pretrain_gpt.py``.

Takes every Megatron-LM flag plus ``--harpe-*`` (``python pretrain_harpe.py --help``). With CUDA it runs
``megatron.training.pretrain``; without CUDA, or with ``--harpe-engine compact``, megatron-core's compact loop
(``megatron_harpe/training/compact.py``). Launch with ``torchrun`` for more than one rank.
"""

import sys

from megatron_harpe.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
