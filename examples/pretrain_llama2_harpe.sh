#!/usr/bin/env bash
# HARPE single-stage continual pretraining of Llama-2 (default 7B) at 131072 tokens (Lian et al. 2024):
# one RoPE base per head from the paper's Table 2, 6B tokens at ~4M tokens/step, lr 2e-5 constant,
# AdamW (0.9, 0.95), bf16, TE flash attention. Any setting is an environment variable (examples/llama2_common.sh).
#
#   LOAD=checkpoints/llama2-7b-tp4 DATA_PATH=data/mixture TOKENIZER_MODEL=llama2/tokenizer.model \
#     examples/pretrain_llama2_harpe.sh            # --dry-run prints the command
#
# HARPE_ARGS chooses the bases. Default for 7B: the paper's list. The documented alternative searches them
# (the paper's Algorithm 1): HARPE_ARGS="--harpe-strategy peak_valley --harpe-base-min 1e6 --harpe-base-max 5e6
# --harpe-stride 30000". Models whose group count is not 32 (13B: 40 heads, 70B: 8 groups) search by default.
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
HARPE_RECIPE=( harpe )   # HARPE_ARGS, else the shape's default bases (megatron_harpe/recipes.py: harpe_rope)
harpe_launch "$@"
