#!/usr/bin/env bash
# HARPE against single- and multi-stage ABF, PI, YaRN and no extension at equal token budgets, offline, on 2 CPU
# cores in about 50 minutes (measured: 47 min for 3 seeds): a small Llama pretrained at L0 = 128 on retrieval-rich synthetic
# text, extended to L1 = 1024 by each method (3 seeds), exported to Hugging Face, evaluated from 128 to 2048 tokens.
# Resumable: run it again after an interruption and finished steps are skipped.
# Usage: examples/compare_methods_cpu.sh [OUTDIR] [--force] [--seeds N] [--methods LIST]
#   (OUTDIR defaults to outputs/compare_cpu; results: OUTDIR/results.md, OUTDIR/pictures/*.png;
#    PRESET=ci runs the minutes-long check of the chain that the test suite runs, PRESET=gpu the H200 one)
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/compare_cpu pass=()
while (( $# )); do
  case $1 in
    --force) pass+=(--force) ;;
    --seeds|--methods) (( $# >= 2 )) || { echo "error: $1 needs a value" >&2; exit 2; }; pass+=("$1" "$2"); shift ;;
    -*) echo "error: unknown option $1 (usage: [OUTDIR] [--force] [--seeds N] [--methods LIST])" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
./scripts/setup_env.sh
exec .venv/bin/python tools/compare_methods.py --preset "${PRESET:-cpu}" --out "$out" ${pass[@]+"${pass[@]}"}
