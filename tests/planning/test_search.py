"""Layout enumeration, the least recompute that fits, communication volumes."""

import dataclasses

import pytest

from megatron_harpe.planning.communication import comm_volume
from megatron_harpe.planning.memory import Layout, estimate_memory
from megatron_harpe.planning.search import Hardware, Request, layouts, search
from megatron_harpe.shape import SHAPES

SEQ = 131072


def test_layouts_respect_megatron_and_harpe_constraints():
    request = Request(SHAPES["70b"], SEQ, 128, 1, 32)
    found = list(layouts(request, Hardware(80)))
    assert (8, 4, 4, 1) in found and (8, 2, 8, 1) in found
    for tp, pp, cp, dp in found:
        assert tp * pp * cp * dp == 128
        assert 8 % tp == 0 and tp <= 8            # whole query groups per rank (8 bases), TP inside a node
        assert 80 % pp == 0 and SEQ % (2 * cp) == 0
    only = list(layouts(dataclasses.replace(request, fixed={"tp": 8, "pp": 4}), Hardware(80)))
    assert only and all(l[:2] == (8, 4) for l in only)


def test_recompute_is_the_least_that_fits():
    request = Request(SHAPES["7b"], SEQ, 8, 1, 32)
    hardware = Hardware(80)
    plans, _ = search(request, hardware)
    blocks = [p for p in plans if p.fits and p.layout.recompute == "block"]
    assert blocks
    for plan in blocks:
        less = dataclasses.replace(plan.layout, recompute_layers=plan.layout.recompute_layers - 1)
        if less.recompute_layers == 0:
            less = dataclasses.replace(less, recompute="none")
        assert estimate_memory(request.shape, less, SEQ).total > hardware.usable_bytes
        assert plan.memory.total <= hardware.usable_bytes
    # More memory, less recompute.
    roomy = search(request, Hardware(141))[0][0]
    assert roomy.layout.recomputed_layers(32) < plans[0].layout.recomputed_layers(32)


def test_communication_volumes():
    shape = SHAPES["7b"]
    base = Layout(tp=1, pp=1, cp=1, dp=8, micro_batch_size=1, num_microbatches=4)
    solo = comm_volume(shape, base, SEQ)
    assert solo.tp == solo.cp == solo.pp == 0 and solo.dp > 0
    tp4 = comm_volume(shape, dataclasses.replace(base, tp=4, dp=2), SEQ)
    # 32 layers x (4 forward + 6 backward collectives) + 4 at the embedding and output, each 3/4 of [s, h] in bf16.
    assert tp4.tp == pytest.approx(4 * (32 * 10 + 4) * 0.75 * 2 * SEQ * 4096)
    more = comm_volume(shape, dataclasses.replace(base, tp=4, dp=2, num_microbatches=8), SEQ)
    assert more.tp == 2 * tp4.tp and more.dp == tp4.dp              # per micro-batch vs once per step
    cp2 = comm_volume(shape, dataclasses.replace(base, cp=2, dp=4), SEQ)
    # K/V of s/2 tokens (2 x 32 heads x 128) go round once forward, twice backward, per layer.
    assert cp2.cp == pytest.approx(4 * 32 * 3 * 2 * (SEQ // 2) * 2 * 32 * 128)
    plain = comm_volume(shape, dataclasses.replace(base, distributed_optimizer=False), SEQ)
    assert plain.dp / solo.dp == pytest.approx(8 / 6)             # all-reduce fp32 vs reduce-scatter fp32 + gather bf16
    recomputed = comm_volume(shape, dataclasses.replace(base, tp=4, dp=2, recompute="full"), SEQ)
    assert recomputed.tp > tp4.tp                                  # the recomputed forward gathers again


def test_block_recompute_with_one_layer_stages():
    request = Request(SHAPES["7b"], SEQ, 32, 1, 32, recompute="block", fixed={"pp": 32})
    plans, _ = search(request, Hardware(80))
    assert plans and all(p.layout.recompute == "block" and p.layout.recompute_layers == 1 for p in plans)
