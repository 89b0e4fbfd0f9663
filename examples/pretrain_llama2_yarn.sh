#!/usr/bin/env bash
# Baseline: YaRN (Peng et al. 2023), scale 32 over Llama-2's 4096 positions, base 10000,
# through Megatron's own YaRN RoPE (--position-embedding-type yarn).
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
MODEL=${MODEL:-7b}
RUN_NAME=${RUN_NAME:-llama2-${MODEL}-yarn}
ROPE_ARGS=( --position-embedding-type yarn --rotary-base 10000 --rotary-scaling-factor "${YARN_SCALE:-32}"
            --yarn-original-max-position-embeddings 4096 )
harpe_launch "$@"
