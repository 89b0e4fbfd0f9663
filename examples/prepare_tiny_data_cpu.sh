#!/usr/bin/env bash
# The data chain on the embedded default, offline, on a CPU (about a minute): synthetic per-source corpora with
# SlimPajama-like length distributions and a 2000-piece sentencepiece model -> tools/preprocess_data.py per source
# -> Fu et al.'s upsampled mixture (long threshold and packing scaled down to the tiny model's 256 tokens).
# Usage: examples/prepare_tiny_data_cpu.sh [OUTDIR] [--force]; then train on it with the printed command.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
out=outputs/tiny_data force=()
for a in "$@"; do
  case $a in
    --force) force=(--force) ;;
    -*) echo "unknown option $a (usage: [OUTDIR] [--force])" >&2; exit 2 ;;
    *) out=$a ;;
  esac
done
"$REPO/scripts/setup_env.sh"
PY=$REPO/.venv/bin/python
"$PY" "$REPO/tools/make_synthetic_corpus.py" --out "$out/corpus" --docs-per-source "${DOCS_PER_SOURCE:-200}" "${force[@]}"
SOURCES_DIR=$out/corpus/sources TOKENIZER_MODEL=$out/corpus/tokenizer.model SEQ_LENGTH=${SEQ_LENGTH:-256} \
  LONG_THRESHOLD=${LONG_THRESHOLD:-1024} TOKENIZER_TYPE=Llama2Tokenizer PYTHON=$PY \
  "$REPO/examples/prepare_long_context_data.sh" "$out" "${force[@]}"
echo "train on it: DATA_PATH=$out/mixture TOKENIZER_MODEL=$out/corpus/tokenizer.model SPLIT=90,10,0 \\"
echo "  examples/pretrain_tiny_harpe_cpu.sh $out/run"
