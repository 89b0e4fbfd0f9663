#!/usr/bin/env bash
# The data chain on the embedded default, offline, on a CPU (about a minute):
#   1. synthetic per-source corpora with SlimPajama-like length distributions and a 2000-piece sentencepiece model
#      -> tools/preprocess_data.py per source -> Fu et al.'s upsampled mixture (long threshold and packing scaled
#      down to the tiny model's SEQ_LENGTH)                                                     -> OUTDIR/mixture
#   2. a retrieval-rich corpus: documents of exactly SEQ_LENGTH tokens, each one of the evaluation's prompts
#      (passkey, NIAH magic-number needle by default: RETRIEVAL_KINDS) followed by its answer, with its own tokenizer
#      -> tools/preprocess_data.py                                         -> OUTDIR/retrieval_stage0_text_document
# Usage: examples/prepare_tiny_data_cpu.sh [OUTDIR] [--force]; then train on either with the printed command.
#   (settings: DOCS_PER_SOURCE 200, SEQ_LENGTH 256, LONG_THRESHOLD 1024, RETRIEVAL_DOCS 2000,
#    RETRIEVAL_KINDS passkey,niah-ruler; RETRIEVAL_DOCS=0 skips step 2)
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
seq=${SEQ_LENGTH:-256} retrieval_docs=${RETRIEVAL_DOCS:-2000}
if [[ ! $retrieval_docs =~ ^[0-9]+$ ]]; then
  echo "error: RETRIEVAL_DOCS=$retrieval_docs: give a whole number (0 skips)" >&2; exit 2
fi
"$REPO/scripts/setup_env.sh"
PY=$REPO/.venv/bin/python
"$PY" "$REPO/tools/make_synthetic_corpus.py" --out "$out/corpus" --docs-per-source "${DOCS_PER_SOURCE:-200}" "${force[@]}"
SOURCES_DIR=$out/corpus/sources TOKENIZER_MODEL=$out/corpus/tokenizer.model SEQ_LENGTH=$seq \
  LONG_THRESHOLD=${LONG_THRESHOLD:-1024} TOKENIZER_TYPE=Llama2Tokenizer PYTHON=$PY \
  "$REPO/examples/prepare_long_context_data.sh" "$out" "${force[@]}"
echo "train on the mixture: DATA_PATH=$out/mixture TOKENIZER_MODEL=$out/corpus/tokenizer.model SPLIT=90,10,0 \\"
echo "  SEQ_LENGTH=$seq examples/pretrain_tiny_harpe_cpu.sh $out/run"
(( retrieval_docs > 0 )) || exit 0
"$PY" "$REPO/tools/make_synthetic_corpus.py" --out "$out/retrieval" --retrieval "stage0:$retrieval_docs:$seq" \
  --retrieval-kinds "${RETRIEVAL_KINDS:-passkey,niah-ruler}" "${force[@]}"
"$PY" "$REPO/tools/preprocess_data.py" --input "$out/retrieval/parts/stage0.jsonl" \
  --output-prefix "$out/retrieval_stage0" --tokenizer-type Llama2Tokenizer \
  --tokenizer-model "$out/retrieval/tokenizer.model" --append-eod --workers "${WORKERS:-$(nproc)}" "${force[@]}"
echo "train on the retrieval corpus: DATA_PATH=$out/retrieval_stage0_text_document \\"
echo "  TOKENIZER_MODEL=$out/retrieval/tokenizer.model SPLIT=98,2,0 SEQ_LENGTH=$seq \\"
echo "  examples/pretrain_tiny_harpe_cpu.sh $out/run"
