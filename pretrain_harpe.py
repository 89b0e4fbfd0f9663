#!/usr/bin/env python
"""Pretrain a Llama-style model with HARPE: the counterpart of Megatron-LM's ``pretrain_gpt.py``.

Takes every Megatron-LM flag plus ``--harpe-*`` (``python pretrain_harpe.py --help``). With CUDA it runs
``megatron.training.pretrain``; without CUDA, or with ``--harpe-engine compact``, megatron-core's compact loop
(``megatron_harpe/training/compact.py``). Launch with ``torchrun`` for more than one rank.
"""

import sys

if __name__ == "__main__":
    # Imports inside the guard: megatron's torch_dist writer starts a 'spawn' Manager, whose child re-imports this
    # file; it must not import all of megatron again. The filter goes first, before megatron's import-time notices.
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()
    from megatron_harpe.training.entry import main

    sys.exit(main())
