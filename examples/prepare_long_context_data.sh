#!/usr/bin/env bash
# Tokenize per-source corpora and build Fu et al.'s per-source length-upsampled mixture (the paper's training data).
#
# Usage: SOURCES_DIR=DIR TOKENIZER_MODEL=llama2/tokenizer.model examples/prepare_long_context_data.sh OUTDIR [--force]
#   SOURCES_DIR holds one entry per source (a folder of .jsonl[.gz] files or one .jsonl[.gz] file) named after
#   SlimPajama's sets: commoncrawl c4 github wikipedia book arxiv stackexchange (RedPajama* names work too).
#   Other files there (a README, notes) are not sources: they are named in a warning and left out.
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

# Sources: folders and JSON-lines files (preprocess_data.py's suffixes); anything else is named and left out.
shopt -s nullglob
entries=() skipped=()
for entry in "$SOURCES_DIR"/*; do
  case $entry in
    *.jsonl | *.json | *.jsonl.gz | *.json.gz | *.ndjson) entries+=( "$entry" ) ;;
    *) if [[ -d $entry ]]; then entries+=( "$entry" ); else skipped+=( "$(basename "$entry")" ); fi ;;
  esac
done
if (( ${#skipped[@]} )); then
  echo "warning: not a source, left out: ${skipped[*]} (sources are folders or .jsonl/.json[.gz]/.ndjson files)" >&2
fi
(( ${#entries[@]} )) || { echo "error: $SOURCES_DIR holds no source (a folder or a .jsonl[.gz] file per source)" >&2; exit 2; }

mkdir -p "$out/tokenized"
sources=()
for entry in "${entries[@]}"; do
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
mix_args=( --seq-length "${SEQ_LENGTH:-131072}" --long-threshold "${LONG_THRESHOLD:-4096}"
           --short-keep-probability "${SHORT_KEEP_PROBABILITY:-0.1}" --format "${FORMAT:-indexed}" )
[[ -n ${TARGET_TOKENS:-} ]] && mix_args+=( --target-tokens "$TARGET_TOKENS" )
"$PY" "$REPO/tools/build_long_context_mix.py" "${sources[@]}" "${mix_args[@]}" --output-prefix "$out/mixture" "${force[@]}"
if [[ ${FORMAT:-indexed} == blend ]]; then
  echo "DATA_PATH=\"$(cat "$out/mixture.data_path.txt")\""
else
  echo "DATA_PATH=$out/mixture"
fi
