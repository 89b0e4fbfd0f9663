"""HARPE against the paper's baselines at equal token budgets, through the project's own chain.

``presets`` (the scale of a comparison), ``methods`` (each method's stage-1 RoPE and stages, from
:mod:`megatron_harpe.recipes`), ``runner`` (corpus -> preprocess -> pretrain -> export -> evaluate, resumable),
``evaluate`` (the eval tools on one exported model), ``report`` (results JSON, markdown table, pictures), ``paper``
(the 7B cluster commands), ``logs`` (a step's log and its failure) and ``cli`` (``harpe-compare-methods``,
``tools/compare_methods.py``).
"""
