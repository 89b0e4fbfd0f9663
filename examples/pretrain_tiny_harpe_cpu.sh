#!/usr/bin/env bash
# A tiny Llama-shaped HARPE model (2 layers, 4 heads in 2 query groups) trained for a few dozen iterations on a
# CPU with the compact engine: mock data by default (DATA_PATH + TOKENIZER_MODEL for real data, e.g. from
# examples/prepare_tiny_data_cpu.sh), tensor parallel 2 over gloo. Checks a configuration end to end before
# cluster hours are spent.
# Usage: examples/pretrain_tiny_harpe_cpu.sh [OUTDIR] [--force] [--dry-run] [-- FLAG ...]
#   (settings: examples/llama2_common.sh; OUTDIR defaults to outputs/tiny_cpu)
set -euo pipefail
source "$(dirname "$0")/llama2_common.sh"
out=outputs/tiny_cpu out_given=0 force=0 dry=() pass=()
usage_hint="use [OUTDIR] [--force] [--dry-run] [-- FLAG ...]; see --help"
while (( $# )); do
  case $1 in
    --force) force=1 ;;
    --dry-run) dry=(--dry-run) ;;
    -h|--help) harpe_usage "[OUTDIR] [--force] [--dry-run] [-- FLAG ...]"; exit 0 ;;
    --) shift; pass=( -- "$@" ); break ;;
    -*) echo "error: unknown option $1 ($usage_hint)" >&2; exit 2 ;;
    *) if (( out_given )); then echo "error: a second OUTDIR '$1' ($usage_hint)" >&2; exit 2; fi
       out=$1 out_given=1 ;;
  esac
  shift
done
if [[ -e $out/checkpoints && $force == 0 && ${#dry[@]} == 0 && -z ${RESUME:-} ]]; then
  echo "error: $out/checkpoints exists: pass --force to start over, RESUME=1 to continue it, or choose another OUTDIR" >&2
  exit 2
fi
# Runs once every check has passed (harpe_launch): --force clears only what this script writes.
harpe_before_launch() {
  if [[ $force == 1 ]]; then rm -rf "$out/checkpoints" "$out/metrics.jsonl"; fi
  mkdir -p "$out"
}
MODEL=tiny
MOCK_DATA=${MOCK_DATA:-$([[ -n ${DATA_PATH:-} ]] && echo 0 || echo 1)}
VOCAB_SIZE=${VOCAB_SIZE:-255}
GPUS_PER_NODE=${NPROC:-2} TP=${TP:-2} PP=${PP:-1} CP=${CP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-256} MBS=${MBS:-2} GBS=${GBS:-8} TRAIN_ITERS=${TRAIN_ITERS:-40}
LR=${LR:-1e-3} WARMUP_ITERS=${WARMUP_ITERS:-4} SAVE_INTERVAL=${SAVE_INTERVAL:-20} EVAL_INTERVAL=${EVAL_INTERVAL:-20}
EVAL_ITERS=${EVAL_ITERS:-2} LOG_INTERVAL=${LOG_INTERVAL:-5}
SAVE=$out/checkpoints MASTER_PORT=${MASTER_PORT:-$(( 20000 + RANDOM % 20000 ))}
HARPE_RECIPE=( harpe -- --harpe-strategy peak_valley --harpe-base-min 1e4 --harpe-base-max 1e6 --harpe-stride 1e4
               --harpe-engine compact --harpe-metrics-file "$out/metrics.jsonl" )
harpe_launch ${dry[@]+"${dry[@]}"} ${pass[@]+"${pass[@]}"}
if [[ ${#dry[@]} == 0 ]]; then echo "checkpoints: $SAVE  metrics: $out/metrics.jsonl"; fi   # --dry-run exits 0
