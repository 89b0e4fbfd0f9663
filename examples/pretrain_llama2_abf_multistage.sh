#!/usr/bin/env bash
# Baseline: multi-stage ABF, (base 1e6, 32k) -> (2e6, 64k) -> (5e6, 128k). Each stage starts from the previous
# stage's checkpoint (the first from LOAD) with a fresh optimizer, keeps ~4M tokens per step (TOKENS_PER_STEP),
# and trains STAGE_TOKENS tokens (default: 6B split evenly). Stage N saves to SAVE/stageN; a restarted run
# resumes each stage from its own SAVE. --dry-run prints the three commands.
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
MODEL=${MODEL:-7b}
run=${RUN_NAME:-llama2-${MODEL}-abf-multistage}
root=${SAVE:-checkpoints/$run}
stage_tokens=${STAGE_TOKENS:-2000000000}
previous=${LOAD:-}
# Probed once for the three stages (one warning where flash-attn is missing); ATTENTION_BACKEND still wins.
if [[ $MODEL != tiny ]]; then ATTENTION_BACKEND=$(harpe_attention_backend); fi
stage=0
for spec in "1000000 32768" "2000000 65536" "5000000 131072"; do
  stage=$((stage + 1))
  read -r base length <<< "$spec"
  echo "# stage $stage: RoPE base $base, $length tokens" >&2
  (
    SAVE=$root/stage$stage LOAD=$previous SEQ_LENGTH=$length TRAIN_TOKENS=$stage_tokens
    unset GBS TRAIN_ITERS   # derived per stage from TOKENS_PER_STEP and the stage's length
    ROPE_ARGS=( --position-embedding-type rope --rotary-base "$base" )
    harpe_launch "$@"
  )
  previous=$root/stage$stage
done
