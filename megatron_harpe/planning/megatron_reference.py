"""Our estimate next to ``megatron.training.theoretical_memory_usage`` for the same parsed Megatron arguments.

Megatron's estimator counts weights and optimizer state as we do (bf16 weights, fp32 gradients, fp32 master and
Adam state, ``6 + 12 / dp`` bytes per parameter with the distributed optimizer), but it shards the optimizer over
DP alone where Megatron shards it over DP x CP. Its activation formula (Korthikanti et al. 2022, Table 2, per
layer ``s b h (18 + 4 ffn / h) / tp`` with sequence parallelism and selective recompute) takes the full sequence
on every rank (no context parallelism), a GeLU MLP's 4 ffn (SwiGLU saves 6 ffn), K and V as wide as Q (no GQA),
and two dropout masks; it ignores full recompute (``report_theoretical_memory`` then uses a formula without
sequence parallelism and without recompute).
"""

from __future__ import annotations

import copy

from megatron_harpe.planning.memory import Layout, MemoryEstimate, estimate_memory
from megatron_harpe.shape import LLAMA2_VOCAB_SIZE, LlamaShape

MIB = 1024 ** 2


def run_shape(args) -> LlamaShape:
    """The model of a parsed run; without ``--vocab-size`` (the tokenizer's, unknown here) Llama-2's 32000."""
    return LlamaShape.from_megatron_args(args, args.vocab_size or LLAMA2_VOCAB_SIZE, strict=False)


def plan_inputs(args) -> tuple[LlamaShape, Layout, int]:
    """Shape, layout and sequence length of a parsed Megatron-LM run (``pretrain_harpe.py``'s arguments)."""
    if args.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("the planner models the non-interleaved 1F1B schedule; drop the virtual pipeline flags")
    shape = run_shape(args)
    recompute, layers = "none", 0
    if args.recompute_granularity == "full":
        if args.recompute_method == "block":
            recompute, layers = "block", args.recompute_num_layers
        elif args.recompute_method == "uniform" and args.recompute_num_layers == 1:
            recompute = "full"
        else:
            raise ValueError("the planner models --recompute-method block, or uniform with --recompute-num-layers 1")
    # Selective recompute (core attention) saves nothing with flash attention, which keeps no s x s scores.
    microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    layout = Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    cp=args.context_parallel_size, dp=args.data_parallel_size,
                    micro_batch_size=args.micro_batch_size, num_microbatches=microbatches, recompute=recompute,
                    recompute_layers=layers, distributed_optimizer=args.use_distributed_optimizer)
    return shape, layout, args.seq_length


def megatron_estimate(args, num_microbatches: int) -> tuple[float, float]:
    """(weights and optimizer, activations) in bytes, as ``report_theoretical_memory`` computes them."""
    from megatron.training import theoretical_memory_usage as tmu

    args = copy.deepcopy(args)
    args.padded_vocab_size = run_shape(args).padded_vocab_size(args.tensor_model_parallel_size,
                                                              args.make_vocab_size_divisible_by)
    weights_and_optimizer = tmu.compute_weight_and_optimizer_memory(args)
    if args.sequence_parallel and args.recompute_granularity == "selective":
        activations = tmu.compute_activation_memory(args, num_microbatches=num_microbatches)
    else:
        activations = tmu.compute_activation_memory_without_sp(args, num_microbatches=num_microbatches)
    return weights_and_optimizer, activations


def compare(args) -> dict:
    """Both estimates for one parsed run, in MiB, split the way Megatron splits them."""
    shape, layout, seq_length = plan_inputs(args)
    ours: MemoryEstimate = estimate_memory(shape, layout, seq_length, harpe=bool(getattr(args, "harpe_bases", None)))
    theirs_static, theirs_activations = megatron_estimate(args, layout.num_microbatches)
    return {
        "ours_weights_and_optimizer_mib": (ours.weights + ours.gradients + ours.optimizer) / MIB,
        "megatron_weights_and_optimizer_mib": theirs_static / MIB,
        "ours_activations_mib": (ours.activations + ours.workspace + ours.logits + ours.rope) / MIB,
        "megatron_activations_mib": theirs_activations / MIB,
        "ours_total_mib": ours.total / MIB,
        "megatron_total_mib": (theirs_static + theirs_activations) / MIB,
    }
