# Shared by examples/pretrain_*.sh (source it; do not run it): a torchrun launcher, the launch scripts' command line
# and --dry-run. The command's flags are the paper's recipes in megatron_harpe/recipes.py (shapes, layouts, the
# training settings); every setting is an environment variable (HARPE_SETTINGS below).
#
# A launcher sets MODEL (7b|13b|70b|tiny) and HARPE_RECIPE (the recipe and its arguments, e.g. ( abf )), then calls
# `harpe_launch "$@"`.
# Its command line: --dry-run prints the full command instead of running it; `-- FLAG ...` appends more
# pretrain_harpe.py flags (as EXTRA_ARGS does); -h/--help prints its usage; anything else is refused.
# Before printing or launching, pretrain_harpe.py --harpe-check-only runs the trainer's own checks on the command
# (Megatron's validate_args, the layout against NNODES x GPUS_PER_NODE, the HARPE bases against the query groups).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The torchrun that launches: TORCHRUN if set, else the repo's .venv/bin/torchrun if present, else torchrun on PATH.
# PYTHON (LAUNCHER=python) follows the same rule.
harpe_torchrun() {
  if [[ -n ${TORCHRUN:-} ]]; then echo "$TORCHRUN"
  elif [[ -x $REPO/.venv/bin/torchrun ]]; then echo "$REPO/.venv/bin/torchrun"
  else echo torchrun; fi
}
harpe_python() {
  if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"
  elif [[ -x $REPO/.venv/bin/python ]]; then echo "$REPO/.venv/bin/python"
  else echo python; fi
}

# Transformer Engine's flash attention backend needs the flash-attn package: FA2 (flash_attn) or FA3
# (flash_attn_interface, flash_attn_3). One probe, shared with benchmarks/gpu_check.sh: is one of them installed
# for the python that will run (found on its path; nothing is imported)?
HARPE_FLASH_ATTN_PROBE="import importlib.util as u, sys
sys.exit(not any(u.find_spec(m) for m in ('flash_attn', 'flash_attn_interface', 'flash_attn_3')))"
harpe_flash_attn_usable() {
  "${1:-python}" -c "$HARPE_FLASH_ATTN_PROBE" > /dev/null 2>&1
}

# The python the launch will run: torchrun's interpreter (its #! line) with LAUNCHER=torchrun, else PYTHON.
harpe_runtime_python() {
  local launcher=${LAUNCHER:-torchrun} path line
  if [[ $launcher == torchrun ]] && path=$(command -v "$(harpe_torchrun)" 2>/dev/null) && [[ -f $path ]]; then
    IFS= read -r line < "$path" || true
    if [[ $line =~ ^\#\!([^[:space:]]*python[^[:space:]]*)$ ]]; then echo "${BASH_REMATCH[1]}"; return; fi
  fi
  harpe_python
}

# harpe_attention_backend [PYTHON]: the --attention-backend value. ATTENTION_BACKEND wins (Megatron's choices);
# else flash where the probe finds flash-attn for PYTHON (default: harpe_runtime_python), else auto (Transformer
# Engine picks) with one warning line on stderr.
harpe_attention_backend() {
  local py=${1:-$(harpe_runtime_python)}
  if [[ -n ${ATTENTION_BACKEND:-} ]]; then
    case $ATTENTION_BACKEND in
      flash|fused|unfused|local|auto) echo "$ATTENTION_BACKEND"; return 0 ;;
      *) echo "error: ATTENTION_BACKEND=$ATTENTION_BACKEND: choose flash, fused, unfused, local or auto" >&2
         return 2 ;;
    esac
  fi
  if harpe_flash_attn_usable "$py"; then
    echo flash
  else
    echo "warning: flash-attn is not installed for $py: --attention-backend auto (Transformer Engine picks;" \
         "ATTENTION_BACKEND=flash forces flash)" >&2
    echo auto
  fi
}

# tools/plan_parallelism.py --emit-env exports its layout with HARPE_PLAN_MODEL, the model it was planned for: a
# launch of another model refuses it instead of running, say, 70B on a 7B plan's one node.
harpe_check_plan() {
  if [[ -n ${HARPE_PLAN_MODEL:-} && $HARPE_PLAN_MODEL != "${MODEL:-7b}" ]]; then
    echo "error: the environment holds tools/plan_parallelism.py's plan for MODEL=$HARPE_PLAN_MODEL, and this" \
         "launch is MODEL=${MODEL:-7b}: plan for ${MODEL:-7b} (--model ${MODEL:-7b}), or drop the plan first:" \
         "unset ${HARPE_PLAN_VARS:-HARPE_PLAN_MODEL}" >&2
    return 2
  fi
}

# The settings megatron_harpe/recipes.py reads (its ENV_NAMES): passed to it exported, as launchers set some as
# plain shell variables. Unset or empty: the recipe's default.
HARPE_SETTINGS=( MODEL NNODES GPUS_PER_NODE TP PP CP SEQ_LENGTH TOKENS_PER_STEP TRAIN_TOKENS MBS GBS TRAIN_ITERS LR
                 WARMUP_ITERS WEIGHT_DECAY SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS SEED RECOMPUTE
                 RECOMPUTE_NUM_LAYERS RUN_NAME SAVE LOAD DATA_PATH TOKENIZER_MODEL SPLIT MOCK_DATA VOCAB_SIZE
                 ATTENTION_BACKEND EXTRA_ARGS HARPE_ARGS ROPE_BASE PI_FACTOR YARN_SCALE STAGE_TOKENS )

# The python that computes the recipe: the repo's .venv/bin/python if present, else python3. Not PYTHON: that is
# the training environment's, and the recipe needs only the standard library and this repository.
harpe_recipe_python() {
  if [[ -x $REPO/.venv/bin/python ]]; then echo "$REPO/.venv/bin/python"; else echo python3; fi
}

# harpe_recipe ARG...: python -m megatron_harpe.recipes ARG... with the settings exported and this repository first
# on the path.
harpe_recipe() {
  ( export "${HARPE_SETTINGS[@]}"
    PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} exec "$(harpe_recipe_python)" -m megatron_harpe.recipes "$@" )
}

harpe_settings() {
  MODEL=${MODEL:-7b}
  harpe_check_plan || return
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-6000}
  PYTHON=$(harpe_python)
  LAUNCHER=${LAUNCHER:-torchrun}      # torchrun, or "python" for one process (CPU runs)
  TORCHRUN=$(harpe_torchrun)
}

# The recipe's command for these settings: ARGS, and the settings it resolved (NNODES, TP, GBS, SAVE, ...), then
# the flags after the script's `--`. On a GPU run the flash-attn probe answers ATTENTION_BACKEND unless it is set.
harpe_megatron_args() {
  local placeholders=() out
  if [[ $1 == 1 ]]; then placeholders=( --placeholders ); fi
  if [[ $MODEL != tiny ]]; then
    ATTENTION_BACKEND=$(harpe_attention_backend) || return
  fi
  out=$(harpe_recipe "${HARPE_RECIPE[0]}" --shell ${placeholders[@]+"${placeholders[@]}"} "${HARPE_RECIPE[@]:1}") \
    || return 2
  eval "$out"
  ARGS+=( ${HARPE_PASS_ARGS[@]+"${HARPE_PASS_ARGS[@]}"} )
}

# harpe_check: pretrain_harpe.py --harpe-check-only on the command, for the job torchrun would start (WORLD_SIZE
# NNODES x GPUS_PER_NODE): the trainer's own checks, once, before anything is printed or launched. One error line
# with the settings it came from, status 2. HARPE_SKIP_CHECK=1 is for callers that check the printed command
# themselves (tools/plan_parallelism.py parses it with the same function).
harpe_check() {
  [[ ${HARPE_SKIP_CHECK:-0} == 1 ]] && return 0
  local py world per_node out status error
  py=$(harpe_runtime_python)
  if [[ $LAUNCHER == torchrun ]]; then world=$(( NNODES * GPUS_PER_NODE )) per_node=$GPUS_PER_NODE
  else world=1 per_node=1; fi
  out=$(WORLD_SIZE=$world LOCAL_WORLD_SIZE=$per_node RANK=0 LOCAL_RANK=0 PYTHONWARNINGS=ignore \
        "$py" "$REPO/pretrain_harpe.py" --harpe-check-only "${ARGS[@]}" 2>&1 > /dev/null) && return 0
  status=$?
  error=$(printf '%s\n' "$out" | sed -n '/^pretrain_harpe.py: error: /,$p')
  if [[ -n $error ]]; then
    echo "error: pretrain_harpe.py refuses these settings: ${error#pretrain_harpe.py: error: } (MODEL=$MODEL" \
         "NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE TP=$TP PP=$PP CP=$CP SEQ_LENGTH=$SEQ_LENGTH MBS=$MBS" \
         "GBS=$GBS)" >&2
  else
    echo "error: could not check the settings: $py pretrain_harpe.py --harpe-check-only exited $status" \
         "($(printf '%s\n' "$out" | tail -n 1)): set PYTHON or TORCHRUN to the training environment's" >&2
  fi
  return 2
}

harpe_check_inputs() {
  local missing=()
  if [[ $MOCK_DATA != 1 ]]; then
    [[ -n $DATA_PATH ]] || missing+=( "DATA_PATH (a Megatron indexed dataset prefix: tools/preprocess_data.py)" )
    [[ -n $TOKENIZER_MODEL && -f $TOKENIZER_MODEL ]] || missing+=( "TOKENIZER_MODEL (Llama-2's tokenizer.model)" )
    for token in $DATA_PATH; do
      [[ $token =~ ^[0-9.eE+-]+$ ]] && continue
      [[ -f $token.idx && -f $token.bin ]] || missing+=( "DATA_PATH entry $token (no $token.bin/.idx)" )
    done
  fi
  [[ -z $LOAD || -d $LOAD ]] || missing+=( "LOAD=$LOAD (not a directory)" )
  if (( ${#missing[@]} )); then
    printf 'error: set or fix:\n' >&2; printf '  %s\n' "${missing[@]}" >&2
    printf '(MOCK_DATA=1 trains on mock data; --dry-run prints the command)\n' >&2
    return 2
  fi
}

harpe_command() {
  if [[ $LAUNCHER == torchrun ]]; then
    CMD=( "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$REPO/pretrain_harpe.py" "${ARGS[@]}" )
  else
    CMD=( "$PYTHON" "$REPO/pretrain_harpe.py" "${ARGS[@]}" )
  fi
}

# harpe_usage [SYNOPSIS]: the usage of the script that runs (HARPE_SCRIPT: a wrapper that execs another names
# itself): its header comment, then the common options.
harpe_usage() {
  local script=${HARPE_SCRIPT:-$0}
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script"
  cat <<EOF

usage: $(basename "$script") ${1:-[--dry-run] [-- FLAG ...]}
  --dry-run    check the settings as pretrain_harpe.py does (shape x layout x bases) and print the command
  -- FLAG ...  more pretrain_harpe.py flags (Megatron-LM's, --harpe-*) after the script's own, e.g. -- --lr 1e-4
               (Megatron keeps the last value of a repeated flag; EXTRA_ARGS="..." does the same)
  -h, --help   this help
Settings are environment variables (examples/llama2_common.sh): MODEL NNODES GPUS_PER_NODE TP PP CP SEQ_LENGTH
MBS GBS TOKENS_PER_STEP TRAIN_TOKENS TRAIN_ITERS LR RECOMPUTE LOAD SAVE DATA_PATH TOKENIZER_MODEL MOCK_DATA
LAUNCHER TORCHRUN PYTHON ATTENTION_BACKEND EXTRA_ARGS (tools/plan_parallelism.py --emit-env prints a layout's).
EOF
}

# harpe_cli ARG...: the launch scripts' command line. Sets HARPE_DRY_RUN (0 or 1) and HARPE_PASS_ARGS (the flags
# after --); answers -h/--help; refuses anything else, so that a typo (--dryrun) never starts a real launch.
harpe_cli() {
  local script
  script=$(basename "${HARPE_SCRIPT:-$0}")
  HARPE_DRY_RUN=0
  HARPE_PASS_ARGS=()
  while (( $# )); do
    case $1 in
      --dry-run) HARPE_DRY_RUN=1 ;;
      -h|--help) harpe_usage; exit 0 ;;
      --) shift; HARPE_PASS_ARGS=( "$@" ); return 0 ;;
      *) echo "error: $script: unknown argument '$1' (see $script --help; pretrain_harpe.py flags go after --," \
              "e.g. $script -- --lr 1e-4)" >&2
         exit 2 ;;
    esac
    shift
  done
}

# harpe_launch [--dry-run] [-- FLAG ...]. A launcher may define harpe_before_launch (e.g. to clear its output
# folder): it runs once every check has passed, right before the launch.
harpe_launch() {
  harpe_cli "$@"
  harpe_prepare || return
  harpe_run
}

# harpe_prepare: the settings and the command (after harpe_cli); harpe_run: check, then print (--dry-run) or launch.
harpe_prepare() {
  harpe_settings || return
  harpe_megatron_args "$HARPE_DRY_RUN" || return
  harpe_command
}

harpe_run() {
  if (( HARPE_DRY_RUN )); then
    harpe_check || return
    printf '%q ' "${CMD[@]}"; printf '\n'
    return 0
  fi
  harpe_check_inputs || return
  harpe_check || return
  if declare -F harpe_before_launch > /dev/null; then harpe_before_launch || return; fi
  export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/CP overlap ordering on pre-Blackwell GPUs
  "${CMD[@]}"
}
