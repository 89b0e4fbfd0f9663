"""The presets keep the paper's proportions: at the paper's own scale they give the paper's numbers."""

import dataclasses

import pytest

from megatron_harpe.command import UsageError
from megatron_harpe.compare.presets import PRESETS, preset


def test_paper_scale_gives_the_papers_bases():
    """Llama-2 4k -> 128k (32 x): ABF base 5M (the paper's), HARPE's search over [1M, 5M] at stride 30k."""
    paper_scale = dataclasses.replace(PRESETS["cpu"], l0=4096, extension=32)
    assert paper_scale.abf_base == pytest.approx(5e6, rel=1e-9)
    low, high, stride = paper_scale.harpe_range
    assert (low, high) == pytest.approx((1e6, 5e6))
    assert stride == pytest.approx(3e4)


def test_lengths_run_from_l0_past_the_trained_length():
    # One loop, not parametrized: a test id holding "gpu" is skipped without CUDA (tests/conftest.py).
    for name, p in PRESETS.items():
        lengths = p.eval_lengths
        assert lengths[0] == p.l0 and lengths[-1] == 2 * p.l1 and p.l1 in lengths, name
        assert all(b == 2 * a for a, b in zip(lengths, lengths[1:])), name
        # HARPE gives each query group a base: a comparison needs more than one group.
        assert p.shape.num_query_groups >= 2, name


def test_cpu_preset_extends_eight_fold_like_the_issue_asks():
    p = PRESETS["cpu"]
    assert p.l1 == 8 * p.l0 and p.seeds == 3


def test_unknown_preset_and_seed_count_are_refused():
    with pytest.raises(UsageError, match="unknown preset 'big'"):
        preset("big")
    with pytest.raises(UsageError, match="--seeds 0: give at least 1"):
        PRESETS["ci"].with_seeds(0)


def test_summary_is_json_and_names_what_a_resume_must_match():
    import json

    summary = json.loads(json.dumps(PRESETS["ci"].summary()))
    assert summary["l1"] == PRESETS["ci"].l1 and summary["shape"]["num_layers"] == PRESETS["ci"].shape.num_layers
