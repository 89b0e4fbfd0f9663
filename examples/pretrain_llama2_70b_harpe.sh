#!/usr/bin/env bash
# HARPE for Llama-2-70B (GQA, 8 query groups: 8 peak-valley bases over [1e6, 5e6], stride 30k),
# 16 nodes x 8 GPUs by default (TP 8, PP 4, CP 4).
MODEL=70b RUN_NAME=${RUN_NAME:-llama2-70b-harpe} HARPE_SCRIPT=$0 \
  exec "$(dirname "$0")/pretrain_llama2_harpe.sh" "$@"
