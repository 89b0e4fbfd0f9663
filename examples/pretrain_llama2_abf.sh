#!/usr/bin/env bash
# Baseline: single-stage ABF (adjusted base frequency): one RoPE base 5e6 for every head, at 131072 tokens,
# otherwise the HARPE recipe. Standard megatron RoPE (no --harpe-* flags).
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
HARPE_RECIPE=( abf )   # ROPE_BASE (default 5e6)
harpe_launch "$@"
