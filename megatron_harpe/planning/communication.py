"""Bytes one GPU sends per training iteration, by parallel group, and whether each group stays inside a node.

Ring collectives send ``(n - 1) / n`` of the tensor per rank for an all-gather or a reduce-scatter and twice that
for an all-reduce. Megatron's rank order is ``tp-cp-ep-dp-pp`` (TP fastest), so the TP group spans ``tp``
consecutive ranks, the CP group ``tp * cp``, the DP group ``tp * cp * dp``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_harpe.planning.memory import BF16, FP32, Layout, stage_parameters
from megatron_harpe.shape import LlamaShape

# Sequence-parallel collectives of one layer (each moves the layer's [s, b, h] activation once):
# forward 2 all-gathers + 2 reduce-scatters; backward the same plus 2 all-gathers that re-gather the
# GEMM inputs saved split along the sequence (for the weight gradients).
TP_COLLECTIVES_FORWARD = 4
TP_COLLECTIVES_BACKWARD = 6


@dataclass(frozen=True)
class CommVolume:
    """Bytes sent per GPU per iteration."""

    tp: float
    cp: float
    pp: float
    dp: float

    @property
    def total(self) -> float:
        return self.tp + self.cp + self.pp + self.dp

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def ring_share(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def group_spans(layout: Layout) -> dict[str, int]:
    """How many consecutive ranks each group spans (a group inside one node if its span fits in the node)."""
    return {"tp": layout.tp, "cp": layout.tp * layout.cp, "dp": layout.tp * layout.cp * layout.dp,
            "pp": layout.gpus}


def comm_volume(shape: LlamaShape, layout: Layout, seq_length: int) -> CommVolume:
    tp, cp = layout.tp, layout.cp
    layers = shape.num_layers // layout.pp
    tokens = layout.micro_batch_size * seq_length // cp
    m = layout.num_microbatches
    recomputed = layout.recomputed_layers(layers)
    layer_passes = layers * (TP_COLLECTIVES_FORWARD + TP_COLLECTIVES_BACKWARD) + recomputed * TP_COLLECTIVES_FORWARD
    activation = BF16 * tokens * shape.hidden_size
    # Embedding (reduce-scatter forward, all-gather backward) and output layer (the reverse) on their stages.
    edge_passes = 2 * (2 if layout.pp == 1 else 1)
    tp_bytes = m * (layer_passes + edge_passes) * ring_share(tp) * activation

    # Ring attention (TE's p2p): K/V go round cp-1 times in forward; K/V and dK/dV in backward.
    kv_chunk = BF16 * tokens * shape.key_value_width / tp
    cp_rounds = (cp - 1) * (layers * 3 + recomputed)
    cp_bytes = m * cp_rounds * kv_chunk

    # Pipeline: each micro-batch's activation forward and its gradient backward, split over TP by sequence parallelism.
    pp_bytes = m * 2 * activation / tp if layout.pp > 1 else 0.0

    # Gradients are reduced over DP x CP (CP ranks hold the same weights).
    params = stage_parameters(shape, tp, layout.pp, 0)
    n = layout.dp * cp
    if layout.distributed_optimizer:
        dp_bytes = ring_share(n) * (FP32 * params + BF16 * params)     # reduce-scatter fp32 grads, all-gather bf16 params
    else:
        dp_bytes = 2 * ring_share(n) * FP32 * params                   # all-reduce fp32 grads
    return CommVolume(tp=tp_bytes, cp=cp_bytes, pp=pp_bytes, dp=dp_bytes)
