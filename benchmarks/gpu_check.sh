#!/usr/bin/env bash
# Everything that needs a GPU, in one go and under 8 minutes on one GPU (made for a single H200, ~15 GPU-minutes):
#   1. the gpu-marked tests (pytest -m gpu: the Triton kernel vs the torch kernel, megatron.training with TE);
#   2. benchmarks/rope.py: the HARPE Triton kernel against TE's fused RoPE and megatron's unfused RoPE;
#   3. pretrain_harpe.py, 20 iterations of a small Llama (8 layers, hidden 2048, 16 heads in 8 query groups) at
#      32768 tokens, TE spec, flash attention, bf16, mock data: HARPE bases (uniform 1e6..5e6), then the same run
#      with megatron's standard RoPE (base 5e6);
# then one table: check | status | key numbers | seconds | log (benchmarks/gpu_check_report.py).
# Every step has its own time limit; a step that fails or runs out of time is a FAIL row, the others still run.
# Each step's full output is kept in OUTDIR. Ctrl-C stops the running step, skips the rest and prints the table.
#
# Usage: benchmarks/gpu_check.sh [OUTDIR | --out OUTDIR] [--force] [--dry-run]
#   OUTDIR     default outputs/gpu_check (in the repository); an existing non-empty OUTDIR needs --force
#   --dry-run  print every command it would run, one per line, and exit (no GPU needed)
# Settings (environment): PYTHON (default .venv/bin/python if present, else python), ATTENTION_BACKEND (flash;
#   auto where the flash-attn package is missing),
#   TIMEOUT_TESTS (140), TIMEOUT_ROPE (90), TIMEOUT_PRETRAIN (90 per run), TIMEOUT_PLANNER (20), TIMEOUT_ENV (40):
#   470 s at most.
# Exit status: 0 all rows PASS, 1 some row failed, 2 usage error or no CUDA GPU, 130 interrupted.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'USAGE'
usage: benchmarks/gpu_check.sh [OUTDIR | --out OUTDIR] [--force] [--dry-run]
  OUTDIR     where the logs and the table go (default outputs/gpu_check in the repository; must not hold files
             unless --force, which replaces it)
  --dry-run  print every command it would run, one per line, and exit 0 (no GPU needed)
USAGE
}

out="" force=0 dry=0
while (( $# )); do
  case $1 in
    --out) (( $# >= 2 )) || { echo "error: --out needs a directory" >&2; exit 2; }; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --force) force=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [[ -z $out ]] || { echo "error: two output directories: $out and $1" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
out=${out:-$REPO/outputs/gpu_check}
[[ $out == /* ]] || out=$PWD/$out
out=$(realpath -m -- "$out" 2>/dev/null || printf '%s' "$out")
if [[ $REPO/ == "$out"/* || $out == "${HOME:-/}" || $out == / ]]; then
  echo "error: $out holds the repository or is your home: choose a directory of its own for the results" >&2; exit 2
fi
cd "$REPO" || exit 2

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python
fi
export PYTHON=$PY PYTHONUNBUFFERED=1   # logs stay complete when a step is killed at its time limit

# Transformer Engine's flash backend needs the flash-attn package (FA2 or FA3); without it TE picks (auto).
if [[ -z ${ATTENTION_BACKEND:-} ]]; then
  if "$PY" -c "import importlib.util as u, sys
sys.exit(not any(u.find_spec(m) for m in ('flash_attn', 'flash_attn_interface', 'flash_attn_3')))" 2>/dev/null; then
    ATTENTION_BACKEND=flash
  else
    ATTENTION_BACKEND=auto
    (( dry )) || echo "note: flash-attn is not installed: --attention-backend auto (Transformer Engine chooses)"
  fi
fi

T_ENV=${TIMEOUT_ENV:-40} T_TESTS=${TIMEOUT_TESTS:-140} T_ROPE=${TIMEOUT_ROPE:-90} T_PRETRAIN=${TIMEOUT_PRETRAIN:-90}
T_PLANNER=${TIMEOUT_PLANNER:-20}

# --- the commands --------------------------------------------------------------------------------------------------
ENV_CMD=( "$PY" benchmarks/gpu_check_report.py env )
# A module that fails to import (a missing optional package) is an error row, but the GPU tests still run.
TEST_CMD=( "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests )
ROPE_CMD=( "$PY" benchmarks/rope.py --device cuda --seq 32768 131072 --dtypes bf16 fp32 --repeats 10
           --model-repeats 10 --json "$out/rope.json" )
# One process on one GPU; --standalone picks a free rendezvous port. No --harpe-engine: auto is megatron on CUDA.
LAUNCH=( env CUDA_DEVICE_MAX_CONNECTIONS=1 "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 1
         pretrain_harpe.py )
# The Llama-2 recipe of examples/llama2_common.sh on a small Llama; no --save, no evaluation, no recompute.
MODEL_ARGS=( --num-layers 8 --hidden-size 2048 --ffn-hidden-size 5504 --num-attention-heads 16
             --group-query-attention --num-query-groups 8
             --seq-length 32768 --max-position-embeddings 32768
             --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
             --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0
             --micro-batch-size 1 --global-batch-size 2 --train-iters 20
             --lr 2e-5 --min-lr 2e-5 --lr-decay-style constant --lr-warmup-iters 2
             --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
             --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1
             --bf16 --transformer-impl transformer_engine --attention-backend "$ATTENTION_BACKEND"
             --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
             --no-create-attention-mask-in-dataloader --seed 1234
             --log-interval 1 --log-throughput --log-memory-interval 10 --eval-iters 0 --eval-interval 1000 )
HARPE_ROPE=( --position-embedding-type rope --harpe-strategy uniform --harpe-base-min 1e6 --harpe-base-max 5e6 )
STANDARD_ROPE=( --position-embedding-type rope --rotary-base 5000000 )
REPORT_CMD=( "$PY" benchmarks/gpu_check_report.py table "$out" )

# --- running steps -------------------------------------------------------------------------------------------------
KILL_AFTER=10   # seconds between the time limit's SIGTERM and SIGKILL
CHILD="" interrupted=0
on_signal() {
  interrupted=1
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null   # timeout passes it on to the step's whole process group
}

# run_step KIND NAME LIMIT_S LOG ARTIFACT CMD...: one row source for the table (KIND: see gpu_check_report.py).
run_step() {
  local kind=$1 name=$2 limit=$3 log=$4 artifact=$5
  shift 5
  if (( dry )); then
    printf '%q ' timeout -k "$KILL_AFTER" "$limit" "$@"; printf '\n'
    return 0
  fi
  local rc=-1 took=0
  if (( interrupted )); then
    echo "--- $name: skipped (interrupted)"
  else
    printf -- '--- %s (limit %s s) -> %s\n' "$name" "$limit" "$log"
    local start=$SECONDS
    timeout -k "$KILL_AFTER" "$limit" "$@" > "$out/$log" 2>&1 < /dev/null &
    CHILD=$!
    while :; do   # wait again after a trapped Ctrl-C until the step is really gone
      wait "$CHILD"; rc=$?
      kill -0 "$CHILD" 2>/dev/null || break
    done
    CHILD=""
    (( interrupted )) && rc=-2   # stopped by Ctrl-C / SIGTERM
    took=$(( SECONDS - start ))
    echo "    exit status $rc after $took s"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$name" "$rc" "$took" "$limit" "$log" "$artifact" >> "$out/steps.tsv"
}

# The planner's estimate for the small Llama above (one GPU, no distributed optimizer, no recompute), which the
# report sets beside the HARPE run's measured peak. A step's KIND (run_step's first argument) picks its row builder
# in benchmarks/gpu_check_report.py (ROW_BUILDERS; unknown kinds are "generic": PASS on exit 0, the log's last line).
PLANNER_MODEL='{"num_layers": 8, "hidden_size": 2048, "ffn_hidden_size": 5504, "num_attention_heads": 16,
 "num_query_groups": 8, "vocab_size": 32000}'
PLANNER_CMD=( "$PY" tools/plan_parallelism.py --model "$out/small_llama.json" --seq-length 32768 --gpus 1
              --gpu-memory 1024 --headroom 0 --micro-batch-size 1 --global-batch-size 2 --tp 1 --pp 1 --cp 1
              --recompute none --no-distributed-optimizer --show-infeasible --top 1 --json )
# --- main ----------------------------------------------------------------------------------------------------------
if (( dry )); then
  printf '%q ' timeout -k 5 "$T_ENV" "${ENV_CMD[@]}"; printf '\n'
fi
replace=0
if (( ! dry )) && [[ -e $out ]] && { [[ ! -d $out ]] || [[ -n $(ls -A "$out" 2>/dev/null) ]]; }; then
  if (( force )); then replace=1; else
    echo "error: $out exists and is not empty: choose another OUTDIR or pass --force to replace it" >&2; exit 2
  fi
fi
if (( ! dry )); then
  # The header, and the CUDA check before anything is created or replaced: exit 2 "no CUDA GPU visible".
  header=$(timeout -k 5 "$T_ENV" "${ENV_CMD[@]}" 2>&1); rc=$?
  if (( rc != 0 )); then
    printf '%s\n' "$header" >&2
    (( rc == 2 )) || echo "error: the environment check failed (exit status $rc): is $PY a working Python with torch?" >&2
    exit 2
  fi
  if (( replace )); then rm -rf "$out" || exit 2; fi
  mkdir -p "$out" || exit 2
  printf 'gpu_check %s, commit %s\n%s\n%-20s%s\n' "$(date '+%Y-%m-%d %H:%M:%S')" \
    "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" "$header" "pretrain:" \
    "--attention-backend $ATTENTION_BACKEND, timeouts: env $T_ENV s, tests $T_TESTS s, rope $T_ROPE s, pretrain $T_PRETRAIN s x 2" \
    | tee "$out/env.txt"
  : > "$out/steps.tsv"
  trap on_signal INT TERM
fi

run_step pytest "gpu tests (pytest -m gpu)" "$T_TESTS" pytest_gpu.log "" "${TEST_CMD[@]}"
run_step rope "rope benchmark" "$T_ROPE" rope.log rope.json "${ROPE_CMD[@]}"
run_step pretrain:harpe "pretrain HARPE" "$T_PRETRAIN" pretrain_harpe.log "" \
  "${LAUNCH[@]}" "${MODEL_ARGS[@]}" "${HARPE_ROPE[@]}"
run_step pretrain:standard "pretrain standard RoPE" "$T_PRETRAIN" pretrain_standard.log "" \
  "${LAUNCH[@]}" "${MODEL_ARGS[@]}" "${STANDARD_ROPE[@]}"
(( dry )) || printf '%s\n' "$PLANNER_MODEL" > "$out/small_llama.json"
run_step planner "planner estimate / measured" "$T_PLANNER" planner.log planner.json \
  bash -c "$(printf '%q ' "${PLANNER_CMD[@]}") > $(printf '%q' "$out/planner.json")"

if (( dry )); then
  printf '%q ' "${REPORT_CMD[@]}"; printf '\n'
  exit 0
fi
trap - INT TERM
echo
"${REPORT_CMD[@]}"; rc=$?
if (( rc != 0 && rc != 1 )); then   # the report itself broke: show what there is
  echo "error: the report failed (exit status $rc); the raw step results (kind, name, exit status, s, limit, log):" >&2
  cat "$out/steps.tsv" >&2
  rc=1
fi
(( interrupted )) && exit 130
exit "$rc"
