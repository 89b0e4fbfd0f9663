#!/usr/bin/env bash
# HARPE for Llama-2-13B (40 heads: 40 peak-valley bases over [1e6, 5e6], stride 30k), 2 nodes x 8 GPUs by default.
MODEL=13b RUN_NAME=${RUN_NAME:-llama2-13b-harpe} HARPE_SCRIPT=$0 \
  exec "$(dirname "$0")/pretrain_llama2_harpe.sh" "$@"
