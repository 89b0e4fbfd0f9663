"""Memory per GPU of a training layout: weights, gradients, optimizer state, activations, logits, RoPE.

The model is Megatron-LM's bf16 recipe as ``examples/llama2_common.sh`` runs it: bf16 weights, fp32 main
gradients (``accumulate_allreduce_grads_in_fp32``), fp32 master weights and two Adam moments, sharded over
DP x CP by the distributed optimizer; sequence parallelism whenever TP > 1; Transformer Engine's flash attention
(no s x s scores); dropout 0; the non-interleaved 1F1B schedule, under which stage ``i`` of ``pp`` holds
``min(pp - i, microbatches)`` micro-batches of activations. Activations per layer are counted tensor by tensor
(what each op saves for backward, Korthikanti et al. 2022 adapted to SwiGLU, GQA and context parallelism); see
:func:`layer_activation_bytes`. Everything is bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_harpe.shape import LlamaShape

BF16, FP32, INT64 = 2, 4, 8
RECOMPUTE_CHOICES = ("none", "block", "full")
# The trainer's --harpe-rope-impl values (rotary.ROPE_IMPLS, which imports torch) -> the memory each
# holds: HARPE's torch and Triton kernels save the same tensors.
ROPE_MEMORY = {"auto": "kernel", "torch": "kernel", "triton": "kernel", "unfused": "unfused"}


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out on ``tp * pp * cp * dp`` GPUs, with its recompute setting."""

    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    recompute: str = "none"          # none | block (recompute_layers per stage) | full (uniform, 1 layer)
    recompute_layers: int = 0
    distributed_optimizer: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def recomputed_layers(self, layers_per_stage: int) -> int:
        return {"none": 0, "block": self.recompute_layers, "full": layers_per_stage}[self.recompute]

    def recompute_label(self) -> str:
        return f"block {self.recompute_layers}" if self.recompute == "block" else self.recompute


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU (pipeline stage ``stage``)."""

    stage: int
    weights: float
    gradients: float
    optimizer: float                 # as configured (distributed or not)
    optimizer_distributed: float
    optimizer_replicated: float
    activations: float               # saved for backward, all micro-batches in flight
    workspace: float                 # transient during one layer's backward (recompute, gathers, gradients, CP ring)
    logits: float                    # output layer and cross entropy (last stage)
    rope: float                      # RoPE tables and what RoPE saves for backward
    harpe_overhead: float            # rope minus what megatron's single-base fused RoPE would hold

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.workspace + self.logits
                + self.rope)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def stage_parameters(shape: LlamaShape, tp: int, pp: int, stage: int) -> float:
    """Parameters one GPU of pipeline stage ``stage`` holds (TP-sharded ones divided by ``tp``)."""
    layers = shape.num_layers // pp
    sharded = layers * shape.layer_sharded_parameters()
    replicated = layers * shape.layer_replicated_parameters()
    first, last = stage == 0, stage == pp - 1
    if first:
        sharded += shape.embedding_parameters(tp)
    if last:
        replicated += shape.hidden_size                      # final norm
        if not shape.tied_embeddings or not first:
            sharded += shape.embedding_parameters(tp)        # output layer (a tied copy on the last stage if pp > 1)
    return sharded / tp + replicated


def layer_activation_bytes(shape: LlamaShape, tokens: int, tp: int) -> float:
    """What one transformer layer saves for backward for ``tokens`` local tokens (micro-batch x seq / cp).

    Under sequence parallelism every saved tensor is split over the TP ranks (layer-norm inputs along the
    sequence, the rest along heads or the FFN width). Per token, in bf16 unless noted:
    input norm input and output (QKV GEMM input) 2h each; q, k, v after RoPE (flash attention's inputs);
    attention output (flash attention's output and the projection's input, one tensor); flash attention's
    softmax statistics (fp32, one per head); MLP norm input and output 2h each; fc1 output (gate and up,
    2 x ffn under SwiGLU) and fc2 input (ffn); the two RMSNorm inverse RMS (fp32).
    """
    h, f = shape.hidden_size, shape.ffn_hidden_size
    per_token = (
        4 * BF16 * h                                                  # two norms: input and output
        + BF16 * (shape.query_width + shape.key_value_width)          # q, k, v
        + BF16 * shape.query_width                                    # attention output
        + FP32 * shape.num_attention_heads                            # softmax log-sum-exp
        + BF16 * ((2 if shape.gated else 1) * f + f)                  # fc1 output, fc2 input
        + 2 * FP32                                                    # inverse RMS of the two norms
    )
    return tokens * per_token / tp


def layer_input_bytes(shape: LlamaShape, tokens: int, tp: int) -> float:
    """What a fully recomputed layer keeps: its input (split over TP by sequence parallelism)."""
    return tokens * BF16 * shape.hidden_size / tp


def backward_workspace_bytes(shape: LlamaShape, tokens: int, layout: Layout) -> float:
    """Transient memory while one layer runs backward (beyond what is saved)."""
    h, tp = shape.hidden_size, layout.tp
    workspace = (
        (2 if shape.gated else 1) * shape.ffn_hidden_size * BF16 * tokens / tp   # gradient of fc1's output
        + 2 * BF16 * h * tokens / tp                                              # gradients in and out of the layer
    )
    if tp > 1:
        workspace += BF16 * h * tokens           # a GEMM input all-gathered over the sequence (sequence parallel)
    if layout.recompute != "none":
        workspace += layer_activation_bytes(shape, tokens, tp)   # the layer being recomputed
    if layout.cp > 1:
        # Ring attention: K/V of the peer being processed and the next one, and as much again for dK/dV.
        workspace += 2 * 2 * BF16 * shape.key_value_width * tokens / tp
    return workspace


def logits_bytes(shape: LlamaShape, tokens: int, tp: int) -> float:
    """Output layer and vocabulary-parallel cross entropy on the last stage, at their peak.

    The bf16 logits and their fp32 copy coexist in forward (the fp32 softmax is kept for backward); backward
    holds the fp32 gradient and its bf16 cast. Plus the final norm's input and output.
    """
    vocab = shape.padded_vocab_size(tp)
    return tokens * ((BF16 + FP32) * vocab + 2 * BF16 * shape.hidden_size) / tp


def rope_bytes(shape: LlamaShape, layout: Layout, seq_length: int, layers_storing: int, *, harpe: bool,
               rope_impl: str = "auto") -> float:
    """RoPE's memory on one GPU of a stage where ``layers_storing`` layers keep their activations.

    megatron's RotaryEmbedding (fused RoPE) keeps one fp32 frequency row per position, shared by all heads and
    layers. HARPE's kernels keep fp32 positions and the ``[groups, d/2]`` table. Megatron's unfused RoPE given
    HARPE's per-head frequencies (``--harpe-rope-impl unfused``) holds an fp32 table per head and saves bf16
    cos and sin per head in every layer.
    """
    seq_local = seq_length // layout.cp
    d = shape.kv_channels
    if not harpe:
        return FP32 * seq_local * d
    groups_local = shape.num_query_groups // layout.tp
    if rope_impl not in ROPE_MEMORY:
        raise ValueError(f"rope_impl {rope_impl!r}: choose one of {', '.join(ROPE_MEMORY)}")
    if ROPE_MEMORY[rope_impl] == "kernel":
        return FP32 * seq_local + FP32 * groups_local * d // 2
    heads_and_groups = shape.num_attention_heads // layout.tp + groups_local
    table = FP32 * seq_local * heads_and_groups * d
    saved_per_layer = 2 * BF16 * seq_local * heads_and_groups * d      # cos and sin for q and k
    return table + saved_per_layer * (layers_storing + (1 if layout.recompute != "none" else 0))


def estimate_memory(shape: LlamaShape, layout: Layout, seq_length: int, *, harpe: bool = True,
                    rope_impl: str = "auto") -> MemoryEstimate:
    """The memory of the most loaded GPU (the first or the last pipeline stage)."""
    stages = sorted({0, layout.pp - 1})
    return max((_stage_memory(shape, layout, seq_length, stage, harpe, rope_impl) for stage in stages),
               key=lambda m: m.total)


def _stage_memory(shape, layout, seq_length, stage, harpe, rope_impl) -> MemoryEstimate:
    tp, pp = layout.tp, layout.pp
    layers = shape.num_layers // pp
    tokens = layout.micro_batch_size * seq_length // layout.cp
    in_flight = min(pp - stage, layout.num_microbatches)
    params = stage_parameters(shape, tp, pp, stage)
    optimizer_replicated = 3 * FP32 * params                         # fp32 master weights, Adam m and v
    optimizer_distributed = optimizer_replicated / (layout.dp * layout.cp)

    recomputed = layout.recomputed_layers(layers)
    per_microbatch = (recomputed * layer_input_bytes(shape, tokens, tp)
                      + (layers - recomputed) * layer_activation_bytes(shape, tokens, tp))
    last = stage == pp - 1
    if stage == 0 or last:
        per_microbatch += tokens * (3 * INT64 + FP32)              # tokens, labels, position ids, loss mask
    harpe_rope = rope_bytes(shape, layout, seq_length, (layers - recomputed) * in_flight, harpe=harpe,
                            rope_impl=rope_impl)
    standard_rope = rope_bytes(shape, layout, seq_length, 0, harpe=False)
    return MemoryEstimate(
        stage=stage,
        weights=BF16 * params,
        gradients=FP32 * params,
        optimizer=optimizer_distributed if layout.distributed_optimizer else optimizer_replicated,
        optimizer_distributed=optimizer_distributed,
        optimizer_replicated=optimizer_replicated,
        activations=in_flight * per_microbatch,
        workspace=backward_workspace_bytes(shape, tokens, layout),
        logits=logits_bytes(shape, tokens, tp) if last else 0.0,
        rope=harpe_rope,
        harpe_overhead=harpe_rope - standard_rope if harpe else 0.0,
    )
