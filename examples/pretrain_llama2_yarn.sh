#!/usr/bin/env bash
# Baseline: YaRN (Peng et al. 2023), scale 32 over Llama-2's 4096 positions, base 10000,
# through Megatron's own YaRN RoPE (--position-embedding-type yarn).
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
HARPE_RECIPE=( yarn )   # YARN_SCALE (default 32)
harpe_launch "$@"
