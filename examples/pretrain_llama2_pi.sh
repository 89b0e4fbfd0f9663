#!/usr/bin/env bash
# Baseline: Position Interpolation (Chen et al. 2023), factor 32 (4096 -> 131072), Llama-2's base 10000,
# through Megatron's --rotary-seq-len-interpolation-factor.
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
MODEL=${MODEL:-7b}
RUN_NAME=${RUN_NAME:-llama2-${MODEL}-pi}
ROPE_ARGS=( --position-embedding-type rope --rotary-base 10000 --rotary-seq-len-interpolation-factor "${PI_FACTOR:-32}" )
harpe_launch "$@"
