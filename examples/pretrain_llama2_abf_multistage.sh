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
# Probed once for the three stages (one warning where flash-attn is missing); ATTENTION_BACKEND still wins.
if [[ $MODEL != tiny ]]; then ATTENTION_BACKEND=$(harpe_attention_backend); fi
count=$(harpe_recipe abf_multistage --stages)
# stages WHAT ARG...: each stage's command (megatron_harpe/recipes.py: SAVE/stageN, LOAD the stage before, GBS and
# TRAIN_ITERS from TOKENS_PER_STEP and STAGE_TOKENS) checked and run in turn; WHAT says so on stderr ("stage" or
# "checking stage").
stages() {
  local what=$1 stage
  shift
  for (( stage = 1; stage <= count; stage++ )); do
    (
      HARPE_RECIPE=( abf_multistage --stage "$stage" )
      harpe_cli "$@"
      harpe_prepare || exit
      echo "# $what $stage: RoPE base $ROPE_BASE, $SEQ_LENGTH tokens" >&2
      harpe_run
    )
  done
}
# A launch checks the three stages' settings first: stage 3's layout is not found wrong after two stages of training.
if (( ! HARPE_DRY_RUN )); then
  stages "checking stage" --dry-run ${HARPE_PASS_ARGS[@]+-- "${HARPE_PASS_ARGS[@]}"} > /dev/null
fi
stages stage "$@"
