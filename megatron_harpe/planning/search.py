"""Enumerate TP x PP x CP x DP layouts for a GPU count, pick the least recompute that fits, rank by estimated step time.

The step-time model only orders layouts; it is not a prediction to plan a budget on. Every layout uses all GPUs,
so the model FLOPs per GPU are the same for all of them: what differs is recompute (one more forward of the
recomputed layers), the pipeline bubble ((pp - 1) / microbatches of the step), and communication: TP's
sequence-parallel collectives are exposed; CP's ring exchange hides behind attention compute up to its length;
the DP reduce-scatter / all-gather hides behind one micro-batch's backward and forward (Megatron's
``--overlap-grad-reduce --overlap-param-gather``); pipeline sends are exposed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron_harpe.planning.communication import CommVolume, comm_volume, group_spans
from megatron_harpe.planning.memory import Layout, MemoryEstimate, estimate_memory
from megatron_harpe.shape import LlamaShape

GIB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gib: float
    gpus_per_node: int = 8
    headroom: float = 0.10           # kept free: CUDA context, NCCL and TE workspaces, allocator fragmentation
    tflops: float = 400.0            # achieved dense bf16 TFLOP/s per GPU (H100/H200-class at long sequences)
    nvlink_gbps: float = 450.0       # GB/s per GPU inside a node
    network_gbps: float = 50.0       # GB/s per GPU across nodes (400 Gb/s InfiniBand per GPU)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gib * GIB * (1 - self.headroom)

    def bandwidth(self, span: int) -> float:
        return (self.nvlink_gbps if span <= self.gpus_per_node else self.network_gbps) * 1e9


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryEstimate
    comm: CommVolume
    step_seconds: float
    fits: bool
    note: str = ""


@dataclass(frozen=True)
class Request:
    shape: LlamaShape
    seq_length: int
    gpus: int
    micro_batch_size: int
    global_batch_size: int
    harpe: bool = True
    rope_impl: str = "auto"     # the trainer's --harpe-rope-impl
    distributed_optimizer: bool = True
    recompute: str = "auto"          # auto (least that fits) | none | block | full
    recompute_layers: int | None = None
    fixed: dict = field(default_factory=dict)   # {"tp": 8, ...}: only layouts with these sizes


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def model_flops_per_token(shape: LlamaShape, seq_length: int, tp: int = 1) -> tuple[float, float]:
    """(forward FLOPs of the transformer layers, of the output layer) per token; causal attention counts half."""
    layers = shape.num_layers * (2 * shape.layer_sharded_parameters() + 2 * seq_length * shape.query_width)
    return layers, 2 * shape.padded_vocab_size(tp) * shape.hidden_size


def step_seconds(request: Request, layout: Layout, comm: CommVolume, hardware: Hardware) -> float:
    shape, seq = request.shape, request.seq_length
    layer_flops, output_flops = model_flops_per_token(shape, seq, layout.tp)
    layers = shape.num_layers // layout.pp
    recompute_share = layout.recomputed_layers(layers) / layers
    tokens = request.global_batch_size * seq
    flops = tokens * (layer_flops * (3 + recompute_share) + 3 * output_flops)
    compute = flops / layout.gpus / (hardware.tflops * 1e12)
    bubble = compute * (layout.pp - 1) / layout.num_microbatches
    attention_share = 2 * seq * shape.query_width / (2 * shape.layer_sharded_parameters() + 2 * seq * shape.query_width)
    spans = group_spans(layout)
    tp_time = comm.tp / hardware.bandwidth(spans["tp"])
    pp_time = comm.pp / hardware.bandwidth(spans["pp"])
    cp_time = max(0.0, comm.cp / hardware.bandwidth(spans["cp"]) - compute * attention_share)
    dp_time = max(0.0, comm.dp / hardware.bandwidth(spans["dp"]) - compute / layout.num_microbatches)
    return compute + bubble + tp_time + pp_time + cp_time + dp_time


def layouts(request: Request, hardware: Hardware) -> Iterator[tuple[int, int, int, int]]:
    """(tp, pp, cp, dp) using all GPUs that megatron and HARPE accept for this model and sequence length."""
    shape = request.shape
    for tp in divisors(request.gpus):
        if tp > hardware.gpus_per_node or shape.num_query_groups % tp or shape.num_attention_heads % tp:
            continue
        for pp in divisors(request.gpus // tp):
            if shape.num_layers % pp:
                continue
            for cp in divisors(request.gpus // (tp * pp)):
                # CP splits the sequence into 2 x cp chunks; sequence parallelism splits a rank's share by TP.
                if request.seq_length % (2 * cp) or (request.seq_length // cp) % tp:
                    continue
                sizes = dict(tp=tp, pp=pp, cp=cp, dp=request.gpus // (tp * pp * cp))
                if all(sizes[k] == v for k, v in request.fixed.items()):
                    yield tp, pp, cp, sizes["dp"]


def recompute_options(request: Request, layers_per_stage: int) -> list[tuple[str, int]]:
    """Candidates from the least recompute to the most."""
    if request.recompute == "none":
        return [("none", 0)]
    if request.recompute == "full":
        return [("full", 0)]
    if request.recompute == "block":
        if request.recompute_layers is not None:
            return [("block", request.recompute_layers)]
        # 1..L-1 (L would be full recompute); a one-layer stage still gets block 1.
        return [("block", k) for k in range(1, max(layers_per_stage, 2))]
    return [("none", 0)] + [("block", k) for k in range(1, layers_per_stage)] + [("full", 0)]


def plan_layout(request: Request, hardware: Hardware, tp: int, pp: int, cp: int, dp: int) -> Plan:
    """The least recompute that fits for this layout, or (not fitting) the most recompute considered."""
    microbatches = request.global_batch_size // (request.micro_batch_size * dp)
    for recompute, k in recompute_options(request, request.shape.num_layers // pp):
        layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, micro_batch_size=request.micro_batch_size,
                        num_microbatches=microbatches, recompute=recompute, recompute_layers=k,
                        distributed_optimizer=request.distributed_optimizer)
        memory = estimate_memory(request.shape, layout, request.seq_length, harpe=request.harpe,
                                 rope_impl=request.rope_impl)
        fits = memory.total <= hardware.usable_bytes
        if fits:
            break
    note = "" if fits else (f"needs {memory.total / GIB:.1f} GiB > {hardware.usable_bytes / GIB:.1f} GiB usable "
                            f"({hardware.gpu_memory_gib:g} GiB less {hardware.headroom:.0%} headroom)")
    comm = comm_volume(request.shape, layout, request.seq_length)
    return Plan(layout, memory, comm, step_seconds(request, layout, comm, hardware), fits, note)


def search(request: Request, hardware: Hardware) -> tuple[list[Plan], list[str]]:
    """All layouts, fitting ones first, each group fastest first; plus why some layouts were not considered."""
    if request.gpus < 1 or request.micro_batch_size < 1 or request.global_batch_size < 1:
        raise ValueError("--gpus, --micro-batch-size and --global-batch-size must be positive")
    plans, skipped = [], []
    for tp, pp, cp, dp in layouts(request, hardware):
        where = f"TP {tp} PP {pp} CP {cp} DP {dp}"
        if request.global_batch_size % (request.micro_batch_size * dp):
            skipped.append(f"{where}: global batch {request.global_batch_size} is not a multiple of micro-batch "
                           f"{request.micro_batch_size} x DP {dp}")
        elif request.recompute_layers is not None and request.recompute_layers > request.shape.num_layers // pp:
            skipped.append(f"{where}: --recompute-layers {request.recompute_layers} exceeds the "
                           f"{request.shape.num_layers // pp} layers of a stage")
        else:
            plans.append(plan_layout(request, hardware, tp, pp, cp, dp))
    plans.sort(key=lambda p: (not p.fits, p.step_seconds, p.memory.total))
    return plans, skipped
