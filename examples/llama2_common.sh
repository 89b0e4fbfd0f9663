# Shared by examples/pretrain_*.sh (source it; do not run it): Llama-2 shapes, the paper's training settings as
# Megatron-LM flags, a torchrun launcher, the launch scripts' command line and --dry-run. Every setting below is an
# environment variable.
#
# A launcher sets MODEL (7b|13b|70b|tiny), its own RoPE flags in ROPE_ARGS, then calls `harpe_launch "$@"`.
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

# Llama-2 (Touvron et al. 2023). 70B uses GQA with 8 query groups: one HARPE base per group.
llama2_shape_args() {
  case $1 in
    7b)   echo "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32" ;;
    13b)  echo "--num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824 --num-attention-heads 40" ;;
    70b)  echo "--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64 --group-query-attention --num-query-groups 8" ;;
    tiny) echo "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2" ;;
    *) echo "unknown MODEL '$1': choose 7b, 13b, 70b or tiny" >&2; return 2 ;;
  esac
}

# Parallel layout chosen to fit 8 x 80 GB GPUs per node at 131072 tokens, bf16, full recompute, DP=1.
# tools/plan_parallelism.py lists the others that fit and prints them as these variables (--emit-env).
llama2_default_layout() {
  case $1 in
    7b)   echo "1 4 1 2" ;;    # NNODES TP PP CP:  8 GPUs
    13b)  echo "2 8 1 2" ;;    #                  16 GPUs
    70b)  echo "16 8 4 4" ;;   #                 128 GPUs
    tiny) echo "1 1 1 1" ;;
  esac
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

harpe_settings() {
  MODEL=${MODEL:-7b}
  harpe_check_plan || return
  read -r d_nnodes d_tp d_pp d_cp <<< "$(llama2_default_layout "$MODEL")"
  NNODES=${NNODES:-$d_nnodes}
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-6000}
  TP=${TP:-$d_tp}
  PP=${PP:-$d_pp}
  CP=${CP:-$d_cp}
  SEQ_LENGTH=${SEQ_LENGTH:-131072}
  # Fu et al. 2024 (followed by the paper): about 4M tokens per step, 6B tokens, lr 2e-5 constant.
  TOKENS_PER_STEP=${TOKENS_PER_STEP:-4194304}
  TRAIN_TOKENS=${TRAIN_TOKENS:-6000000000}
  MBS=${MBS:-1}
  GBS=${GBS:-$(( TOKENS_PER_STEP / SEQ_LENGTH ))}
  TRAIN_ITERS=${TRAIN_ITERS:-$(( (TRAIN_TOKENS + GBS * SEQ_LENGTH - 1) / (GBS * SEQ_LENGTH) ))}
  LR=${LR:-2e-5}
  WARMUP_ITERS=${WARMUP_ITERS:-20}
  WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}   # not stated by the paper; Llama-2's pretraining value
  SAVE_INTERVAL=${SAVE_INTERVAL:-100}
  LOG_INTERVAL=${LOG_INTERVAL:-1}
  EVAL_INTERVAL=${EVAL_INTERVAL:-100}
  EVAL_ITERS=${EVAL_ITERS:-4}
  SEED=${SEED:-1234}
  RECOMPUTE=${RECOMPUTE:-full}        # full | block | selective | none (tools/plan_parallelism.py picks one)
  RECOMPUTE_NUM_LAYERS=${RECOMPUTE_NUM_LAYERS:-1}   # block: layers per pipeline stage recomputed in full
  RUN_NAME=${RUN_NAME:-llama2-${MODEL}-harpe}
  SAVE=${SAVE:-checkpoints/$RUN_NAME}
  LOAD=${LOAD:-}                      # converted Hugging Face checkpoint (tools/convert_hf_to_megatron.py)
  DATA_PATH=${DATA_PATH:-}            # Megatron blend: "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..."
  TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
  SPLIT=${SPLIT:-99990,8,2}           # train,valid,test shares of DATA_PATH's documents
  MOCK_DATA=${MOCK_DATA:-0}
  PYTHON=$(harpe_python)
  LAUNCHER=${LAUNCHER:-torchrun}      # torchrun, or "python" for one process (CPU runs)
  TORCHRUN=$(harpe_torchrun)
  EXTRA_ARGS=${EXTRA_ARGS:-}          # more pretrain_harpe.py flags, as after `--` on the command line
}

# Megatron-LM flags for the model, optimiser, parallelism, data and checkpoints.
harpe_megatron_args() {
  local placeholder_ok=$1
  ARGS=( $(llama2_shape_args "$MODEL") )
  ARGS+=( --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
          --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
          --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0
          --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
          --lr "$LR" --min-lr "$LR" --lr-decay-style constant --lr-warmup-iters "$WARMUP_ITERS"
          --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay "$WEIGHT_DECAY" --clip-grad 1.0
          --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
          --no-create-attention-mask-in-dataloader --seed "$SEED"
          --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
          --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist --save "$SAVE" --load "$SAVE" )
  if [[ $MODEL != tiny ]]; then
    local backend
    backend=$(harpe_attention_backend) || return
    ARGS+=( --bf16 --transformer-impl transformer_engine --attention-backend "$backend" --use-distributed-optimizer
            --overlap-grad-reduce --overlap-param-gather --distributed-timeout-minutes 60 )
    if (( TP > 1 )); then ARGS+=( --sequence-parallel ); fi
    case $RECOMPUTE in
      full) ARGS+=( --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 ) ;;
      block) ARGS+=( --recompute-granularity full --recompute-method block --recompute-num-layers "$RECOMPUTE_NUM_LAYERS" ) ;;
      selective) ARGS+=( --recompute-granularity selective ) ;;
      none) ;;
      *) echo "RECOMPUTE=$RECOMPUTE: choose full, block, selective or none" >&2; return 2 ;;
    esac
  else
    ARGS+=( --transformer-impl local )   # the tiny CPU model: megatron's local spec with the SDPA core attention
  fi
  # The first run fine-tunes from LOAD; a restart resumes from SAVE (Megatron's --pretrained-checkpoint).
  if [[ -n $LOAD ]]; then ARGS+=( --pretrained-checkpoint "$LOAD" ); fi
  if [[ $MOCK_DATA == 1 ]]; then
    ARGS+=( --mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-32000}" )
  else
    local data=${DATA_PATH:-} tok=${TOKENIZER_MODEL:-}
    if [[ $placeholder_ok == 1 ]]; then data=${data:-'<DATA_PATH>'}; tok=${tok:-'<TOKENIZER_MODEL>'}; fi
    ARGS+=( --data-path $data --split "$SPLIT" --tokenizer-type Llama2Tokenizer --tokenizer-model "$tok" )
  fi
  # shellcheck disable=SC2206
  ARGS+=( ${ROPE_ARGS[@]+"${ROPE_ARGS[@]}"} $EXTRA_ARGS ${HARPE_PASS_ARGS[@]+"${HARPE_PASS_ARGS[@]}"} )
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
  harpe_settings || return
  harpe_megatron_args "$HARPE_DRY_RUN" || return
  harpe_command
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
