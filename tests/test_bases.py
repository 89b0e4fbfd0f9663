import math

import numpy as np
import pytest

from megatron_harpe.bases import (
    PAPER_LLAMA2_7B_BASES,
    attention_waveform,
    parse_bases,
    select_bases,
    validate_bases,
    waveform_extrema,
    waveform_ripple,
)

LLAMA = dict(head_dim=128, target_length=131072)


def test_paper_table2_preset():
    assert len(PAPER_LLAMA2_7B_BASES) == 32
    assert PAPER_LLAMA2_7B_BASES[0] == 1_000_000 and PAPER_LLAMA2_7B_BASES[-1] == 4_540_000
    assert list(PAPER_LLAMA2_7B_BASES) == sorted(PAPER_LLAMA2_7B_BASES)
    # Table 2 lies on the 30k stride grid from 1M, as Algorithm 1 requires.
    assert all((b - 1_000_000) % 30_000 == 0 for b in PAPER_LLAMA2_7B_BASES)
    assert parse_bases("paper-llama2-7b") == list(PAPER_LLAMA2_7B_BASES)
    assert parse_bases("PAPER-LLAMA2-7B") == list(PAPER_LLAMA2_7B_BASES)


def test_uniform_is_eq9():
    n, lo, hi = 32, 1e6, 5e6
    got = select_bases(n, "uniform", lo, hi, **LLAMA)
    assert got == [lo + h * (hi - lo) / (n - 1) for h in range(n)]
    assert got[0] == lo and got[-1] == hi
    assert select_bases(n, "uniform", lo, hi, descending=True, **LLAMA) == got[::-1]
    assert select_bases(1, "uniform", lo, hi, **LLAMA) == [lo]


def test_geometric_is_log_spaced():
    got = select_bases(8, "geometric", 1e4, 1e6, **LLAMA)
    ratios = np.diff(np.log(got))
    assert np.allclose(ratios, ratios[0]) and math.isclose(got[0], 1e4) and math.isclose(got[-1], 1e6)


@pytest.fixture(scope="module")
def peak_valley_32():
    return select_bases(32, "peak_valley", 1e6, 5e6, stride=30000, **LLAMA)


def test_peak_valley_grid_start_order_and_uniqueness(peak_valley_32):
    got = peak_valley_32
    assert len(got) == 32
    assert got[0] == 1e6  # starts from {b_min}
    assert got == sorted(got)  # returned ascending, like Table 2
    assert len(set(got)) == 32
    assert all(1e6 <= b <= 5e6 for b in got)
    assert all(abs(((b - 1e6) / 30000) - round((b - 1e6) / 30000)) < 1e-9 for b in got)


def test_peak_valley_is_deterministic(peak_valley_32):
    assert select_bases(32, "peak_valley", 1e6, 5e6, stride=30000, **LLAMA) == peak_valley_32


def test_peak_valley_interleaves_better_than_uniform(peak_valley_32):
    uniform = select_bases(32, "uniform", 1e6, 5e6, **LLAMA)
    assert waveform_ripple(peak_valley_32, **LLAMA) < waveform_ripple(uniform, **LLAMA)


def test_peak_valley_descending_and_small_cases():
    asc = select_bases(4, "peak_valley", 1e4, 1e5, stride=5000, head_dim=64, target_length=8192)
    desc = select_bases(4, "peak_valley", 1e4, 1e5, stride=5000, head_dim=64, target_length=8192, descending=True)
    assert desc == asc[::-1]
    assert select_bases(1, "peak_valley", 1e4, 1e5, head_dim=64, target_length=8192) == [1e4]


def test_peak_valley_64_bases():
    # 64 heads (Llama-2-70B's query heads) need 64 of the 134 grid candidates: all distinct, on the grid.
    # How long it takes is measured in benchmarks/bases.py, not asserted here.
    got = select_bases(64, "peak_valley", 1e6, 5e6, stride=30000, **LLAMA)
    assert len(set(got)) == 64 and got == sorted(got) and got[0] == 1e6
    assert all(abs(((b - 1e6) / 30000) - round((b - 1e6) / 30000)) < 1e-9 and b <= 5e6 for b in got)


def test_waveform_is_the_long_term_decay_bound():
    # At m = 0 every partial sum |sum_{k<j} 1| = j, so W(0) = mean_j j = (d/2 + 1) / 2.
    d, L = 16, 1024
    m, w = attention_waveform(10000.0, head_dim=d, target_length=L, num_points=L, samples_per_point=1)
    assert m[0] == 0 and w[0] == pytest.approx((d // 2 + 1) / 2)
    # Compare with the formula evaluated directly at one distance.
    theta = 10000.0 ** (-np.arange(0, d, 2) / d)
    direct = np.abs(np.cumsum(np.exp(1j * 100 * theta))).mean()
    assert w[100] == pytest.approx(direct)
    peaks, valleys = waveform_extrema(np.array([0, 2, 1, 3, 0, 1]))
    assert list(peaks) == [1, 3] and list(valleys) == [2, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_bases=0), "num_bases"),
        (dict(strategy="random"), "unknown base strategy"),
        (dict(base_min=-1.0), "base_min"),
        (dict(base_min=float("nan")), "base_min"),
        (dict(base_max=5e5), "base_max"),
        (dict(head_dim=7), "head_dim"),
        (dict(target_length=0), "target_length"),
        (dict(strategy="peak_valley", stride=0), "stride"),
        (dict(strategy="peak_valley", stride=1e6), "lower the stride"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(num_bases=8, strategy="uniform", base_min=1e6, base_max=5e6, head_dim=128, target_length=4096)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        select_bases(args.pop("num_bases"), args.pop("strategy"), args.pop("base_min"), args.pop("base_max"), **args)


def test_parse_bases():
    assert parse_bases("1e6, 2.5e6 3e6") == [1e6, 2.5e6, 3e6]
    for bad, message in [("", "empty"), ("1e6,abc", "cannot read 'abc'"), ("1e6,-5", "positive"), ("inf", "positive")]:
        with pytest.raises(ValueError, match=message):
            parse_bases(bad)


def test_validate_bases():
    assert validate_bases([1, 2], 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match="one RoPE base per query group: got 3 bases for 2"):
        validate_bases([1, 2, 3], 2)
    with pytest.raises(ValueError, match="query group 1 is 0.0"):
        validate_bases([1, 0], 2)
    with pytest.raises(ValueError, match="positive and finite"):
        validate_bases([1, float("nan")], 2)
