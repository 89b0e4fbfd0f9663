#!/usr/bin/env bash
# The whole chain on the embedded default, on a CPU, no downloads:
#   1. HARPE bases: the paper's and a peak-valley search, their waveforms, a TP=2 check  -> OUTDIR/demo
#   2. synthetic sources -> 2000-piece tokenizer -> .bin/.idx -> Fu et al. mixture         -> OUTDIR/data
#   3. a tiny HARPE Llama pretrained on it (compact engine, tensor parallel 2)           -> OUTDIR/run
#   4. its Megatron checkpoint exported to Hugging Face (HARPE model, auto_map)          -> OUTDIR/hf
#   5. Needle-in-a-Haystack heatmap and passkey accuracy of the exported model           -> OUTDIR/eval
# The tiny model learns the filler's statistics, not retrieval: expect scores near 0; the point is the chain.
# Usage: examples/quickstart_cpu.sh [OUTDIR] [--force]   (settings: DOCS_PER_SOURCE, TRAIN_ITERS)
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/quickstart force=0
for a in "$@"; do
  case $a in
    --force) force=1 ;;
    -*) echo "unknown option $a (usage: [OUTDIR] [--force])" >&2; exit 2 ;;
    *) out=$a ;;
  esac
done
# What this script writes into OUTDIR; --force removes these and nothing else.
written=(demo data run hf eval)
if [[ -d $out && -n $(ls -A "$out") ]]; then
  if [[ $force == 0 ]]; then
    echo "error: $out exists and is not empty: choose another OUTDIR or pass --force to replace it" >&2; exit 1
  fi
  foreign=()
  for entry in "$out"/* "$out"/.[!.]*; do
    [[ -e $entry ]] || continue
    [[ " ${written[*]} " == *" ${entry##*/} "* ]] || foreign+=( "${entry##*/}" )
  done
  if (( ${#foreign[@]} )); then
    echo "error: $out holds ${foreign[*]}, which the quickstart did not write: --force would delete them;" \
         "move them or choose another OUTDIR" >&2; exit 1
  fi
  for entry in "${written[@]}"; do rm -rf "${out:?}/$entry"; done
fi
./scripts/setup_env.sh
PY=.venv/bin/python
step() { echo; echo "=== [$1/5] $2"; }

step 1 "HARPE bases and the tensor-parallel check"
"$PY" tools/harpe_demo.py --out "$out/demo"
step 2 "synthetic data -> tokenizer -> indexed datasets -> long-context mixture"
DOCS_PER_SOURCE=${DOCS_PER_SOURCE:-200} examples/prepare_tiny_data_cpu.sh "$out/data" > "$out.data.log" 2>&1 \
  || { cat "$out.data.log" >&2; exit 1; }
mv "$out.data.log" "$out/data/prepare.log"
grep -E "sequences of|tokens in documents" "$out/data/prepare.log"
step 3 "tiny HARPE pretraining on the mixture"
DATA_PATH=$out/data/mixture TOKENIZER_MODEL=$out/data/corpus/tokenizer.model SPLIT=90,10,0 \
  TRAIN_ITERS=${TRAIN_ITERS:-40} MASTER_PORT=$(( 20000 + RANDOM % 20000 )) examples/pretrain_tiny_harpe_cpu.sh "$out/run" > "$out/run.log" 2>&1 \
  || { tail -n 40 "$out/run.log" >&2; exit 1; }
grep -E "iteration +[0-9]+/" "$out/run.log" | sed -n '1p;$p'
step 4 "Megatron checkpoint -> Hugging Face"
# --allow-pickle: a torch_dist checkpoint's .metadata is a pickle; this one was written by step 3 just now.
"$PY" tools/convert_megatron_to_hf.py --megatron-dir "$out/run/checkpoints" --out "$out/hf" --allow-pickle \
  --tokenizer-model "$out/data/corpus/tokenizer.model" 2>&1 | grep -E "^wrote|error"
step 5 "Needle-in-a-Haystack and passkey"
"$PY" tools/eval_niah.py --model "$out/hf" --out "$out/eval/niah" --lengths 128,192,240 --depths 0,0.25,0.5,0.75,1 \
  --max-new-tokens 16 --batch-size 5 2>&1 | grep -v -E "^(needle|Loading)" || true
"$PY" tools/eval_passkey.py --model "$out/hf" --out "$out/eval/passkey" --lengths 192,240 --trials 3 2>&1 \
  | grep -E "passkey accuracy|^mean|error" || true
[[ -f $out/eval/niah/niah.png && -f $out/eval/passkey/passkey.json ]] || { echo "error: evaluation failed" >&2; exit 1; }
cat <<DONE

Done. Everything is under $out:
  demo/                     bases.json, waveforms_*.png, tp2_rank*.json (TP=2 vs TP=1 check)
  data/                     corpus/ (synthetic sources, tokenizer.model), tokenized/, mixture.{bin,idx},
                            mixture.length_histogram.png, mixture.mixture.json
  run/                      checkpoints/ (Megatron torch_dist), metrics.jsonl; run.log
  hf/                       the exported HARPE model (AutoModelForCausalLM, trust_remote_code=True)
  eval/niah/niah.png        Needle-in-a-Haystack heatmap (niah.json beside it)
  eval/passkey/passkey.json passkey accuracy by length
DONE
