#!/usr/bin/env bash
# Baseline: Position Interpolation (Chen et al. 2023), factor 32 (4096 -> 131072), Llama-2's base 10000,
# through Megatron's --rotary-seq-len-interpolation-factor.
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
HARPE_RECIPE=( pi )   # PI_FACTOR (default 32)
harpe_launch "$@"
