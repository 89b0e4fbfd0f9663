#!/usr/bin/env bash
# Tokenize per-source corpora and build Fu et al.'s per-source length-upsampled mixture (the paper's training data).
#
# Usage: SOURCES_DIR=DIR TOKENIZER_MODEL=llama2/tokenizer.model examples/prepare_long_context_data.sh OUTDIR [--force]
#   SOURCES_DIR holds one entry per source (a folder of .jsonl[.gz] files or one .jsonl[.gz] file) named after
#   SlimPajama's sets: commoncrawl c4 github wikipedia book arxiv stackexchange (RedPajama* names work too).
#   SlimPajama ships its sets mixed in .jsonl.zst chunks: decompress (zstd -d) and split them by
#   meta.redpajama_set_name first, e.g. jq -c 'select(.meta.redpajama_set_name=="RedPajamaBook")'.
# Settings (environment): WORKERS (all cores), SEQ_LENGTH (131072), TARGET_TOKENS (default: the largest mixture
#   that repeats no kept document; the paper trains on 6e9), LONG_THRESHOLD (4096), SHORT_KEEP_PROBABILITY (0.1),
#   FORMAT (indexed | blend), TOKENIZER_TYPE (Llama2Tokenizer).
# Writes OUTDIR/tokenized/<source>_text_document.{bin,idx} (reused when present unless --force) and
# OUTDIR/mixture.{bin,idx} (+ .mixture.json, .length_histogram.png); prints the DATA_PATH to train on.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$([[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python)}
out="" force=()
for a in "$@"; do
  case $a in
    --force) force=(--force) ;;
    -*) echo "unknown option $a (usage: OUTDIR [--force])" >&2; exit 2 ;;
    *) out=$a ;;
  esac
done
missing=()
[[ -n $out ]] || missing+=( "OUTDIR (first argument)" )
[[ -n ${SOURCES_DIR:-} && -d ${SOURCES_DIR:-} ]] || missing+=( "SOURCES_DIR (a directory with one entry per source)" )
[[ -n ${TOKENIZER_MODEL:-} && -f ${TOKENIZER_MODEL:-} ]] || missing+=( "TOKENIZER_MODEL (Llama-2's tokenizer.model)" )
if (( ${#missing[@]} )); then printf 'error: set or fix:\n' >&2; printf '  %s\n' "${missing[@]}" >&2; exit 2; fi

mkdir -p "$out/tokenized"
sources=()
for entry in "$SOURCES_DIR"/*; do
  name=$(basename "$entry"); name=${name%%.*}
  prefix=$out/tokenized/$name
  if [[ -f ${prefix}_text_document.idx && ${#force[@]} == 0 ]]; then
    echo "reusing ${prefix}_text_document (--force to redo)"
  else
    "$PY" "$REPO/tools/preprocess_data.py" --input "$entry" --output-prefix "$prefix" \
      --tokenizer-type "${TOKENIZER_TYPE:-Llama2Tokenizer}" --tokenizer-model "$TOKENIZER_MODEL" --append-eod \
      --workers "${WORKERS:-$(nproc)}" "${force[@]}"
  fi
  sources+=( --source "$name=${prefix}_text_document" )
done
(( ${#sources[@]} )) || { echo "error: $SOURCES_DIR is empty" >&2; exit 2; }
mix_args=( --seq-length "${SEQ_LENGTH:-131072}" --long-threshold "${LONG_THRESHOLD:-4096}"
           --short-keep-probability "${SHORT_KEEP_PROBABILITY:-0.1}" --format "${FORMAT:-indexed}" )
[[ -n ${TARGET_TOKENS:-} ]] && mix_args+=( --target-tokens "$TARGET_TOKENS" )
"$PY" "$REPO/tools/build_long_context_mix.py" "${sources[@]}" "${mix_args[@]}" --output-prefix "$out/mixture" "${force[@]}"
if [[ ${FORMAT:-indexed} == blend ]]; then
  echo "DATA_PATH=\"$(cat "$out/mixture.data_path.txt")\""
else
  echo "DATA_PATH=$out/mixture"
fi
