#!/usr/bin/env bash
# Baseline: single-stage ABF (adjusted base frequency): one RoPE base 5e6 for every head, at 131072 tokens,
# otherwise the HARPE recipe. Standard megatron RoPE (no --harpe-* flags).
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
MODEL=${MODEL:-7b}
RUN_NAME=${RUN_NAME:-llama2-${MODEL}-abf}
ROPE_ARGS=( --position-embedding-type rope --rotary-base "${ROPE_BASE:-5000000}" )
harpe_launch "$@"
