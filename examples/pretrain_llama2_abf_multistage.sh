#!/usr/bin/env bash
# Baseline: multi-stage ABF, (base 1e6, 32k) -> (2e6, 64k) -> (5e6, 128k). Each stage starts from the previous
# stage's checkpoint (the first from LOAD) with a fresh optimizer, keeps ~4M tokens per step (TOKENS_PER_STEP),
# and trains STAGE_TOKENS tokens (default: 6B split evenly). Stage N saves to SAVE/stageN; a restarted run
# resumes each stage from its own SAVE. --dry-run prints the three commands; a launch checks all three first.
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
harpe_cli "$@"       # once, before the stages: a wrong argument or a plan for another model stops all three
MODEL=${MODEL:-7b}
harpe_check_plan
run=${RUN_NAME:-llama2-${MODEL}-abf-multistage}
root=${SAVE:-checkpoints/$run}
stage_tokens=${STAGE_TOKENS:-2000000000}
# Probed once for the three stages (one warning where flash-attn is missing); ATTENTION_BACKEND still wins.
if [[ $MODEL != tiny ]]; then ATTENTION_BACKEND=$(harpe_attention_backend); fi
# stages WHAT ARG...: harpe_launch ARG... of each stage in turn; WHAT says so on stderr ("stage" or "checking stage").
stages() {
  local what=$1 stage=0 previous=${LOAD:-} spec base length
  shift
  for spec in "1000000 32768" "2000000 65536" "5000000 131072"; do
    stage=$((stage + 1))
    read -r base length <<< "$spec"
    echo "# $what $stage: RoPE base $base, $length tokens" >&2
    (
      SAVE=$root/stage$stage LOAD=$previous SEQ_LENGTH=$length TRAIN_TOKENS=$stage_tokens
      unset GBS TRAIN_ITERS   # derived per stage from TOKENS_PER_STEP and the stage's length
      ROPE_ARGS=( --position-embedding-type rope --rotary-base "$base" )
      harpe_launch "$@"
    )
    previous=$root/stage$stage
  done
}
# A launch checks the three stages' settings first: stage 3's layout is not found wrong after two stages of training.
if (( ! HARPE_DRY_RUN )); then
  stages "checking stage" --dry-run ${HARPE_PASS_ARGS[@]+-- "${HARPE_PASS_ARGS[@]}"} > /dev/null
fi
stages stage "$@"
