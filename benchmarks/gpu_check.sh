#!/usr/bin/env bash
# Everything that needs a GPU, in one go and under 8 minutes on one GPU (made for a single H200, ~15 GPU-minutes),
# also on a bare machine with torch and Triton but no Transformer Engine, megatron-core or flash-attn:
#   0. wheels: megatron-core, Liger-Kernel and nltk from .whl/ (benchmarks/gpu_wheels.sh) when the python lacks them;
#   1. the gpu-marked tests (pytest -m gpu: the Triton kernel vs the torch kernel, its 64-bit offsets, training);
#   2. benchmarks/rope.py --check-kernels: the HARPE Triton kernel against the HARPE torch kernel at 32k and 128k
#      tokens (bf16, fp32, forward and backward), then fwd+bwd time against megatron's unfused standard RoPE,
#      Liger-Kernel's Triton RoPE and (where Transformer Engine is importable) TE's fused RoPE;
#   3. pretrain_harpe.py, 20 iterations of a small Llama (8 layers, hidden 2048, 16 heads in 8 query groups) at
#      32768 tokens, bf16, mock data, Transformer Engine's layer spec where TE is importable, else megatron's local
#      spec with the torch-SDPA core attention (and the TE/apex-only fusions off): HARPE bases (uniform 1e6..5e6),
#      then megatron's standard RoPE (base 5e6); the logs must say which layer spec and which RoPE kernel ran;
#   4. tools/plan_parallelism.py's estimate for that run against its measured peak;
# then one table: check | status | key numbers | seconds | log (benchmarks/gpu_check_report.py).
# Every step has its own time limit; a step that fails or runs out of time is a FAIL row, the others still run.
# Each step's full output is kept in OUTDIR. Ctrl-C stops the running step, skips the rest and prints the table.
#
# Usage: benchmarks/gpu_check.sh [OUTDIR | --out OUTDIR] [--force] [--dry-run] [--only STEPS]
#   OUTDIR       default outputs/gpu_check (in the repository); an existing non-empty OUTDIR needs --force
#   --dry-run    print every command it would run, one per line, and exit (no GPU needed)
#   --only STEPS comma-separated subset of tests,rope,pretrain,planner (planner needs pretrain's measured peak)
# Settings (environment):
#   PYTHON             default .venv/bin/python if present, else python3, else python
#   WHEELS_DIR         wheels installed when megatron-core, nltk or Liger-Kernel is missing (default .whl)
#   WHEEL_SITE         where they go (pip --target; default /tmp/site), put first on PYTHONPATH
#   TRANSFORMER_IMPL   transformer_engine | local (default: transformer_engine where TE is importable, else local)
#   ATTENTION_BACKEND  default flash where flash-attn is installed, else auto (examples/llama2_common.sh's probe)
#   TIMEOUT_WHEELS (30), TIMEOUT_ENV (30), TIMEOUT_TESTS (120), TIMEOUT_ROPE (90), TIMEOUT_PRETRAIN (90 per run),
#   TIMEOUT_PLANNER (20): 470 s at most.
# The repository is put first on PYTHONPATH (tools/ and benchmarks/ import megatron_harpe from it).
# Exit status: 0 all rows PASS, 1 some row failed, 2 usage error, no CUDA GPU or no megatron-core, 130 interrupted.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../examples/llama2_common.sh
source "$REPO/examples/llama2_common.sh"   # the flash-attn probe (harpe_attention_backend) and the recipe

usage() {
  cat <<'USAGE'
usage: benchmarks/gpu_check.sh [OUTDIR | --out OUTDIR] [--force] [--dry-run] [--only STEPS]
  OUTDIR        where the logs and the table go (default outputs/gpu_check in the repository; must not hold files
                unless --force, which replaces it)
  --dry-run     print every command it would run, one per line, and exit 0 (no GPU needed)
  --only STEPS  run only these of tests,rope,pretrain,planner (comma-separated; planner needs pretrain)
USAGE
}

ALL_STEPS=(tests rope pretrain planner)
out="" force=0 dry=0 only=""
while (( $# )); do
  case $1 in
    --out) (( $# >= 2 )) || { echo "error: --out needs a directory" >&2; exit 2; }; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --only) (( $# >= 2 )) || { echo "error: --only needs a list of steps" >&2; exit 2; }; only=$2; shift ;;
    --only=*) only=${1#--only=} ;;
    --force) force=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [[ -z $out ]] || { echo "error: two output directories: $out and $1" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
declare -A SELECTED=()
if [[ -n $only ]]; then
  IFS=, read -r -a wanted <<< "$only"
  for s in "${wanted[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "error: --only $only: unknown step '$s' (choose from ${ALL_STEPS[*]})" >&2; exit 2; }
    SELECTED[$s]=1
  done
else
  for s in "${ALL_STEPS[@]}"; do SELECTED[$s]=1; done
fi
selected() { [[ -n ${SELECTED[$1]:-} ]]; }

out=${out:-$REPO/outputs/gpu_check}
[[ $out == /* ]] || out=$PWD/$out
out=$(realpath -m -- "$out" 2>/dev/null || printf '%s' "$out")
if [[ $REPO/ == "$out"/* || $out == "${HOME:-/}" || $out == / ]]; then
  echo "error: $out holds the repository or is your home: choose a directory of its own for the results" >&2; exit 2
fi
cd "$REPO" || exit 2
replace=0
if (( ! dry )) && [[ -e $out ]] && { [[ ! -d $out ]] || [[ -n $(ls -A "$out" 2>/dev/null) ]]; }; then
  if (( force )); then replace=1; else
    echo "error: $out exists and is not empty: choose another OUTDIR or pass --force to replace it" >&2; exit 2
  fi
fi

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
elif command -v python3 > /dev/null; then PY=python3
else PY=python
fi
export PYTHON=$PY PYTHONUNBUFFERED=1   # logs stay complete when a step is killed at its time limit
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

T_WHEELS=${TIMEOUT_WHEELS:-30} T_ENV=${TIMEOUT_ENV:-30} T_TESTS=${TIMEOUT_TESTS:-120} T_ROPE=${TIMEOUT_ROPE:-90}
T_PRETRAIN=${TIMEOUT_PRETRAIN:-90} T_PLANNER=${TIMEOUT_PLANNER:-20}
for t in "$T_WHEELS" "$T_ENV" "$T_TESTS" "$T_ROPE" "$T_PRETRAIN" "$T_PLANNER"; do
  [[ $t =~ ^[1-9][0-9]*$ ]] || { echo "error: a TIMEOUT_* setting is '$t': give whole seconds > 0" >&2; exit 2; }
done
KILL_AFTER=10   # seconds between the time limit's SIGTERM and SIGKILL

# --- wheels: what a bare machine lacks -------------------------------------------------------------------------------
# The modules the steps import that a bare torch + Triton machine does not have (megatron-core is the one without
# which nothing runs); printed space-separated, nothing when all are there.
MODULE_PROBE="import importlib.util as u
def found(m):
    try:
        return u.find_spec(m) is not None
    except (ImportError, ValueError):
        return False
print(' '.join(m for m in ('megatron.core', 'megatron.training', 'nltk', 'liger_kernel') if not found(m)))"
WHEELS_DIR=${WHEELS_DIR:-$REPO/.whl} WHEEL_SITE=${WHEEL_SITE:-/tmp/site}
missing=$("$PY" -c "$MODULE_PROBE" 2>/dev/null) || missing=""   # a broken python: the env step says why
shopt -s nullglob
wheels=( "$WHEELS_DIR"/*.whl )
shopt -u nullglob
INSTALL_CMD=( "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
              --target "$WHEEL_SITE" "${wheels[@]}" )
install=0
if [[ -n $missing ]]; then
  if (( ${#wheels[@]} )); then
    install=1
  elif [[ " $missing " == *" megatron.core "* ]]; then
    echo "error: megatron-core is not importable by $PY and $WHEELS_DIR holds no wheels: run" \
         "benchmarks/gpu_wheels.sh where a package registry is reachable and bring .whl/ along, or set" \
         "PYTHONPATH to a megatron-core 0.19 install" >&2
    exit 2
  fi
fi
wheels_log="" wheels_rc=0 wheels_took=0
if (( install )); then
  if (( dry )); then
    printf '%q ' timeout -k "$KILL_AFTER" "$T_WHEELS" "${INSTALL_CMD[@]}"; printf '\n'
  else
    wheels_log=$(mktemp "${TMPDIR:-/tmp}/gpu_check_wheels.XXXXXX")
    echo "--- wheels: $PY lacks ${missing// /, }: installing ${#wheels[@]} wheels from $WHEELS_DIR into $WHEEL_SITE"
    start=$SECONDS
    timeout -k "$KILL_AFTER" "$T_WHEELS" "${INSTALL_CMD[@]}" > "$wheels_log" 2>&1 < /dev/null; wheels_rc=$?
    wheels_took=$(( SECONDS - start ))
    if (( wheels_rc == 0 )); then
      echo "installed ${#wheels[@]} wheels into $WHEEL_SITE: $(cd "$WHEELS_DIR" && printf '%s ' *.whl)" >> "$wheels_log"
    fi
  fi
  export PYTHONPATH=$WHEEL_SITE:$PYTHONPATH
  if (( ! dry )); then
    still=$("$PY" -c "$MODULE_PROBE" 2>/dev/null) || still="megatron.core"
    if (( wheels_rc != 0 )) || [[ " $still " == *" megatron.core "* ]]; then
      cat "$wheels_log" >&2
      echo "error: installing the wheels of $WHEELS_DIR into $WHEEL_SITE failed (exit status $wheels_rc) or left" \
           "megatron-core unimportable: run benchmarks/gpu_wheels.sh again (one version of each package)" >&2
      rm -f "$wheels_log"
      exit 2
    fi
    [[ -z $still ]] || echo "note: still missing after the wheels: $still (their rows will say so)"
  fi
fi

# --- layer spec and attention backend --------------------------------------------------------------------------------
if [[ -z ${TRANSFORMER_IMPL:-} ]]; then
  if "$PY" -c "import transformer_engine.pytorch" > /dev/null 2>&1; then TRANSFORMER_IMPL=transformer_engine
  else TRANSFORMER_IMPL=local; fi
fi
case $TRANSFORMER_IMPL in
  transformer_engine) SPEC_ARGS=( --transformer-impl transformer_engine ); EXPECT_SPEC=transformer_engine ;;
  # Without TE (and apex): megatron's local spec (torch norms), with the fused kernels that need them off.
  local) SPEC_ARGS=( --transformer-impl local --no-rope-fusion --no-gradient-accumulation-fusion
                     --no-persist-layer-norm ); EXPECT_SPEC=local ;;
  *) echo "error: TRANSFORMER_IMPL=$TRANSFORMER_IMPL: choose transformer_engine or local" >&2; exit 2 ;;
esac
# TE's flash backend needs flash-attn; without it auto (one warning line). The local spec's SDPA ignores it.
ATTENTION_BACKEND=$(harpe_attention_backend "$PY") || exit 2

# --- the commands --------------------------------------------------------------------------------------------------
ENV_CMD=( "$PY" benchmarks/gpu_check_report.py env )
# A module that fails to import (a missing optional package) is an error row, but the GPU tests still run.
# -rA lists every test's outcome, so the table can name the kernel tests (the 64-bit offset one among them).
TEST_CMD=( "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --continue-on-collection-errors tests )
ROPE_CMD=( "$PY" benchmarks/rope.py --device cuda --seq 32768 131072 --dtypes bf16 fp32 --repeats 10
           --model-repeats 10 --check-kernels --json "$out/rope.json" )
# One process on one GPU; --standalone picks a free rendezvous port. No --harpe-engine: auto is megatron on CUDA.
LAUNCH=( env CUDA_DEVICE_MAX_CONNECTIONS=1 "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 1
         pretrain_harpe.py )
# The small Llama of the pretrain runs, and of the planner's estimate beside them.
PLANNER_MODEL='{"num_layers": 8, "hidden_size": 2048, "ffn_hidden_size": 5504, "num_attention_heads": 16,
 "num_query_groups": 8, "vocab_size": 32000}'
# small_recipe ARG...: python -m megatron_harpe.recipes ARG... for the small Llama at 32768 tokens on one GPU, 20
# iterations, with none of the caller's launch settings (TP, LR, ... are the launch scripts', not this check's).
small_recipe() {
  ( unset "${HARPE_SETTINGS[@]}"
    MODEL=$PLANNER_MODEL SEQ_LENGTH=32768 TP=1 PP=1 CP=1 MBS=1 GBS=2 TRAIN_ITERS=20 WARMUP_ITERS=2
    harpe_recipe "$@" )
}
# recipe_flags NAME ARG...: the array NAME from small_recipe's lines (exit 2 with its error when it fails).
recipe_flags() {
  local name=$1 lines
  shift
  lines=$(small_recipe "$@") || exit 2
  mapfile -t "$name" <<< "$lines"
}
# The paper's Llama-2 recipe (shape, batch, optimiser, layout: megatron_harpe/recipes.py) on the small Llama; no
# --save, no evaluation, no recompute.
recipe_flags RECIPE_ARGS --part base harpe
MODEL_ARGS=( "${RECIPE_ARGS[@]}"
             --bf16 "${SPEC_ARGS[@]}" --attention-backend "$ATTENTION_BACKEND"
             --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
             --no-create-attention-mask-in-dataloader --seed 1234
             --log-interval 1 --log-throughput --log-memory-interval 10 --eval-iters 0 --eval-interval 1000 )
recipe_flags HARPE_ROPE --part rope harpe -- --harpe-strategy uniform --harpe-base-min 1e6 --harpe-base-max 5e6
recipe_flags STANDARD_ROPE --part rope abf   # megatron's standard RoPE at ABF's base, 5e6
REPORT_CMD=( "$PY" benchmarks/gpu_check_report.py table "$out" )

# --- running steps -------------------------------------------------------------------------------------------------
CHILD="" interrupted=0
on_signal() {
  interrupted=1
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null   # timeout passes it on to the step's whole process group
}

record_step() {   # KIND NAME RC SECONDS LIMIT LOG ARTIFACT EXPECT: one line of steps.tsv (gpu_check_report.py)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$out/steps.tsv"
}

# run_step KIND NAME LIMIT_S LOG ARTIFACT EXPECT CMD...: one row source for the table (KIND: see
# gpu_check_report.py; EXPECT: what its log must say, e.g. spec=local,kernel=triton for a pretrain run).
run_step() {
  local kind=$1 name=$2 limit=$3 log=$4 artifact=$5 expect=$6
  shift 6
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
  record_step "$kind" "$name" "$rc" "$took" "$limit" "$log" "$artifact" "$expect"
}

# The planner's estimate for the small Llama above (one GPU, no distributed optimizer, no recompute), which the
# report sets beside the HARPE run's measured peak. A step's KIND (run_step's first argument) picks its row builder
# in benchmarks/gpu_check_report.py (ROW_BUILDERS; unknown kinds are "generic": PASS on exit 0, the log's last line).
PLANNER_CMD=( "$PY" tools/plan_parallelism.py --model "$out/small_llama.json" --seq-length 32768 --gpus 1
              --gpu-memory 1024 --headroom 0 --micro-batch-size 1 --global-batch-size 2 --tp 1 --pp 1 --cp 1
              --recompute none --no-distributed-optimizer --show-infeasible --top 1 --json )
# --- main ----------------------------------------------------------------------------------------------------------
if (( dry )); then
  printf '%q ' timeout -k 5 "$T_ENV" "${ENV_CMD[@]}"; printf '\n'
fi
if (( ! dry )); then
  # The header, and the CUDA check before anything is created or replaced: exit 2 "no CUDA GPU visible".
  header=$(timeout -k 5 "$T_ENV" "${ENV_CMD[@]}" 2>&1); rc=$?
  if (( rc != 0 )); then
    printf '%s\n' "$header" >&2
    (( rc == 2 )) || echo "error: the environment check failed (exit status $rc): is $PY a working Python with torch?" >&2
    [[ -n $wheels_log ]] && rm -f "$wheels_log"
    exit 2
  fi
  if (( replace )); then rm -rf "$out" || exit 2; fi
  mkdir -p "$out" || exit 2
  wheels_note="not needed (nothing missing)"
  (( install )) && wheels_note="${#wheels[@]} from $WHEELS_DIR into $WHEEL_SITE (missing: $missing)"
  printf 'gpu_check %s, commit %s\n%s\n%-20s%s\n%-20s%s\n%-20s%s\n' "$(date '+%Y-%m-%d %H:%M:%S')" \
    "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" "$header" "wheels:" "$wheels_note" \
    "pretrain:" "--transformer-impl $TRANSFORMER_IMPL, --attention-backend $ATTENTION_BACKEND" "timeouts:" \
    "wheels $T_WHEELS s, env $T_ENV s, tests $T_TESTS s, rope $T_ROPE s, pretrain $T_PRETRAIN s x 2, planner $T_PLANNER s" \
    | tee "$out/env.txt"
  : > "$out/steps.tsv"
  if (( install )); then
    mv "$wheels_log" "$out/wheels.log"
    record_step wheels "wheels (megatron-core, Liger-Kernel, nltk)" "$wheels_rc" "$wheels_took" "$T_WHEELS" wheels.log "" ""
  fi
  trap on_signal INT TERM
fi

if selected tests; then
  run_step pytest "gpu tests (pytest -m gpu)" "$T_TESTS" pytest_gpu.log "" "" "${TEST_CMD[@]}"
fi
if selected rope; then
  run_step rope "rope benchmark" "$T_ROPE" rope.log rope.json "" "${ROPE_CMD[@]}"
fi
if selected pretrain; then
  run_step pretrain:harpe "pretrain HARPE" "$T_PRETRAIN" pretrain_harpe.log "" "spec=$EXPECT_SPEC,kernel=triton" \
    "${LAUNCH[@]}" "${MODEL_ARGS[@]}" "${HARPE_ROPE[@]}"
  run_step pretrain:standard "pretrain standard RoPE" "$T_PRETRAIN" pretrain_standard.log "" \
    "spec=$EXPECT_SPEC,kernel=none" "${LAUNCH[@]}" "${MODEL_ARGS[@]}" "${STANDARD_ROPE[@]}"
fi
if selected planner; then
  (( dry )) || printf '%s\n' "$PLANNER_MODEL" > "$out/small_llama.json"
  run_step planner "planner estimate / measured" "$T_PLANNER" planner.log planner.json "" \
    bash -c "$(printf '%q ' "${PLANNER_CMD[@]}") > $(printf '%q' "$out/planner.json")"
fi

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
