# Shared by examples/pretrain_*.sh (source it; do not run it): Llama-2 shapes, the paper's training settings as
# Megatron-LM flags, a torchrun launcher and --dry-run. Every setting below is an environment variable.
#
# A launcher sets MODEL (7b|13b|70b|tiny), its own RoPE flags in ROPE_ARGS, then calls `harpe_launch "$@"`.
# `--dry-run` as the first argument prints the full command instead of running it.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

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
  if [[ $launcher == torchrun ]] && path=$(command -v "${TORCHRUN:-torchrun}" 2>/dev/null) && [[ -f $path ]]; then
    IFS= read -r line < "$path" || true
    if [[ $line =~ ^\#\!([^[:space:]]*python[^[:space:]]*)$ ]]; then echo "${BASH_REMATCH[1]}"; return; fi
  fi
  echo "${PYTHON:-python}"
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

harpe_settings() {
  MODEL=${MODEL:-7b}
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
  PYTHON=${PYTHON:-python}
  LAUNCHER=${LAUNCHER:-torchrun}      # torchrun, or "python" for one process (CPU runs)
  TORCHRUN=${TORCHRUN:-torchrun}
  EXTRA_ARGS=${EXTRA_ARGS:-}
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
  ARGS+=( ${ROPE_ARGS[@]+"${ROPE_ARGS[@]}"} $EXTRA_ARGS )
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

# harpe_launch [--dry-run]
harpe_launch() {
  local dry=0
  [[ ${1:-} == --dry-run ]] && dry=1
  harpe_settings
  harpe_megatron_args "$dry" || return
  harpe_command
  if (( dry )); then
    printf '%q ' "${CMD[@]}"; printf '\n'
    return 0
  fi
  harpe_check_inputs || return
  export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/CP overlap ordering on pre-Blackwell GPUs
  "${CMD[@]}"
}
