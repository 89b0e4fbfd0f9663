#!/usr/bin/env bash
# The whole chain on the embedded default, on a CPU, no downloads:
#   1. HARPE bases: the paper's and a peak-valley search, their waveforms, a TP=2 check  -> OUTDIR/demo
#   2. synthetic sources -> tokenizer -> .bin/.idx -> Fu et al. mixture, and a retrieval-rich
#      corpus (passkey and magic-number needles with their answers, 128-token documents)  -> OUTDIR/data
#   3. a small HARPE Llama (2 layers, hidden 128, 4 heads in 2 query groups) pretrained from
#      scratch on the retrieval corpus at 128 tokens (compact engine, tensor parallel 2)  -> OUTDIR/run
#   4. its Megatron checkpoint exported to Hugging Face (HARPE model, auto_map)          -> OUTDIR/hf
#   5. Needle-in-a-Haystack heatmap and passkey accuracy of the exported model           -> OUTDIR/eval
# Its 600 iterations (2.5M tokens; the whole script took 3 min 15 s on 2 cores) only start retrieval (400 give 0):
# expect passkey around 0.3-0.5 at 96-128 tokens and the needle found at some depths at its trained length, 128 (about 0.2; 0 at 96 and 112: every
# training document is 128 tokens long). TRAIN_ITERS=2400 (4x the time) gives passkey about 0.7.
# Usage: examples/quickstart_cpu.sh [OUTDIR] [--force]   (settings: DOCS_PER_SOURCE, RETRIEVAL_DOCS, TRAIN_ITERS)
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
step 2 "synthetic data -> tokenizer -> indexed datasets -> long-context mixture; retrieval corpus"
DOCS_PER_SOURCE=${DOCS_PER_SOURCE:-200} RETRIEVAL_DOCS=${RETRIEVAL_DOCS:-8000} SEQ_LENGTH=128 LONG_THRESHOLD=512 \
  examples/prepare_tiny_data_cpu.sh "$out/data" > "$out.data.log" 2>&1 || { cat "$out.data.log" >&2; exit 1; }
mv "$out.data.log" "$out/data/prepare.log"
grep -E "sequences of|tokens in documents|^wrote .*retrieval" "$out/data/prepare.log"
step 3 "HARPE pretraining from scratch on the retrieval corpus"
# One thread per rank: two ranks share the two cores (torchrun's default; set here for other launchers too).
iters=${TRAIN_ITERS:-600}  # warmup below: megatron needs it shorter than the run
OMP_NUM_THREADS=1 DATA_PATH=$out/data/retrieval_stage0_text_document \
  TOKENIZER_MODEL=$out/data/retrieval/tokenizer.model SPLIT=98,2,0 SEQ_LENGTH=128 MBS=32 GBS=32 TRAIN_ITERS=$iters \
  LR=3e-3 WARMUP_ITERS=$(( iters < 300 ? iters / 10 : 30 )) SAVE_INTERVAL=$iters EVAL_INTERVAL=$iters EVAL_ITERS=2 \
  LOG_INTERVAL=$(( iters < 100 ? 5 : 100 )) MASTER_PORT=$(( 20000 + RANDOM % 20000 )) \
  examples/pretrain_tiny_harpe_cpu.sh "$out/run" -- --hidden-size 128 --ffn-hidden-size 384 --lr-decay-style cosine \
  --min-lr 3e-4 > "$out/run.log" 2>&1 || { tail -n 40 "$out/run.log" >&2; exit 1; }
grep -E "iteration +[0-9]+/" "$out/run.log" | sed -n '1p;$p'
step 4 "Megatron checkpoint -> Hugging Face"
# --allow-pickle: a torch_dist checkpoint's .metadata is a pickle; this one was written by step 3 just now.
"$PY" tools/convert_megatron_to_hf.py --megatron-dir "$out/run/checkpoints" --out "$out/hf" --allow-pickle \
  --tokenizer-model "$out/data/retrieval/tokenizer.model" 2>&1 | grep -E "^wrote|error"
step 5 "Needle-in-a-Haystack (magic-number needle) and passkey"
"$PY" tools/eval_niah.py --model "$out/hf" --out "$out/eval/niah" --needle-style ruler --lengths 96,112,128 \
  --depths 0,0.25,0.5,0.75,1 --max-new-tokens 12 --batch-size 5 2>&1 | grep -v -E "^(needle|Loading)" || true
"$PY" tools/eval_passkey.py --model "$out/hf" --out "$out/eval/passkey" --lengths 96,128 --trials 10 --batch-size 10 \
  2>&1 | grep -E "passkey accuracy|^mean|error" || true
[[ -f $out/eval/niah/niah.png && -f $out/eval/passkey/passkey.json ]] || { echo "error: evaluation failed" >&2; exit 1; }
cat <<DONE

Done. Everything is under $out:
  demo/                     bases.json, waveforms_*.png, tp2_rank*.json (TP=2 vs TP=1 check)
  data/                     corpus/ (synthetic sources, tokenizer.model), tokenized/, mixture.{bin,idx},
                            mixture.length_histogram.png, mixture.mixture.json; retrieval/ (parts/stage0.jsonl,
                            tokenizer.model), retrieval_stage0_text_document.{bin,idx} (what step 3 trains on)
  run/                      checkpoints/ (Megatron torch_dist), metrics.jsonl; run.log
  hf/                       the exported HARPE model (AutoModelForCausalLM, trust_remote_code=True)
  eval/niah/niah.png        Needle-in-a-Haystack heatmap (niah.json beside it)
  eval/passkey/passkey.json passkey accuracy by length
DONE
