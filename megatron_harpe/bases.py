"""RoPE base selection for HARPE: one base per attention head (per query group under GQA).

The paper (Lian et al., COLING 2025, section 3.2) gives two strategies:

* ``uniform`` - Eq. 9: ``b_h = b_min + h (b_max - b_min) / (N - 1)``.
* ``peak_valley`` - Algorithm 1, after Chen et al. 2024 ("Fortify the Shortest Stave in Attention"):
  candidates ``b_min + i * stride`` on ``(b_min, b_max]``; start from ``{b_min}``; greedily add the
  candidate whose attention-waveform peaks sit closest to the selected set's valleys and whose valleys
  sit closest to the set's peaks, until there is one base per head.

The *attention waveform* of a base is RoFormer's long-term-decay curve, the relative upper bound of the
attention score against the relative distance m::

    W_b(m) = (2/d) * sum_{j=1..d/2} | sum_{k<j} exp(i m theta_k) |,   theta_k = b^(-2k/d)

The paper leaves unstated how the waveform is sampled and how peaks are paired with valleys. Our choices:

* **Sampling.** ``W_b`` sampled at integer distances is dominated by ripple from the fastest
  frequencies (a local extremum every few tokens), which says nothing about long-range coverage. We
  box-filter it: the waveform is evaluated on ``num_points + 1`` evenly spaced distances over
  ``[0, target_length]``, each value being the mean of ``W_b`` over a window of width
  ``target_length / num_points`` centred there (``samples_per_point`` stratified samples). Ripple
  shorter than two windows is removed; the waves of thousands of tokens that differ between bases stay.
* **Peaks and valleys** are the strict local maxima and minima of that sampled curve.
* **The selected set's waveform** is the mean of its members' waveforms (what the heads cover together).
* **Pairing.** Every peak of the candidate is paired with the nearest valley of the set and every
  valley with the nearest peak; ``d`` is the *mean* of those distances (a mean rather than a sum, so a
  candidate is not favoured merely for having fewer extrema). The smallest ``d`` wins; ties go to the
  smaller base.

For Llama-2-7B (b_min=1e6, b_max=5e6, stride=30k, 32 heads, head_dim 128, 131072 tokens) this search
lands on the same stride grid as the paper's Table 2 but not on the same list; see the README for the
comparison. The paper's list is available as :data:`PAPER_LLAMA2_7B_BASES` (``paper-llama2-7b``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

#: The paper's Table 2 bases for Llama-2-7B, heads 1..32 (peak-valley search, 1M..5M, stride 30k).
PAPER_LLAMA2_7B_BASES: tuple[float, ...] = tuple(
    round(v * 1e6)
    for v in (
        1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
        3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
    )
)

#: Named base lists accepted wherever a list of bases is.
PRESETS: dict[str, tuple[float, ...]] = {"paper-llama2-7b": PAPER_LLAMA2_7B_BASES}

STRATEGIES = ("peak_valley", "uniform", "geometric")

# Waveform sampling defaults (see the module docstring).
DEFAULT_NUM_POINTS = 1024
DEFAULT_SAMPLES_PER_POINT = 8


def _check_positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_head_dim(head_dim: int) -> None:
    if not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 2 (the rotary dimension), got {head_dim!r}")


def attention_waveform(
    base: float,
    *,
    head_dim: int,
    target_length: int,
    num_points: int = DEFAULT_NUM_POINTS,
    samples_per_point: int = DEFAULT_SAMPLES_PER_POINT,
) -> tuple[np.ndarray, np.ndarray]:
    """Box-filtered RoPE attention waveform of ``base``: ``(distances, values)``, each ``num_points + 1`` long."""
    _check_positive_finite("base", base)
    _check_head_dim(head_dim)
    if target_length < 1:
        raise ValueError(f"target_length must be >= 1, got {target_length}")
    width = target_length / num_points
    distances = np.arange(num_points + 1, dtype=np.float64) * width
    # Stratified samples inside each window, clipped to [0, target_length] at the two ends.
    offsets = ((np.arange(samples_per_point) + 0.5) / samples_per_point - 0.5) * width
    m = np.clip(distances[:, None] + offsets[None, :], 0.0, float(target_length)).ravel()
    theta = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    partial_sums = np.cumsum(np.exp(1j * np.outer(m, theta)), axis=1)
    bound = np.abs(partial_sums).mean(axis=1)  # (2/d) * sum over the d/2 partial sums
    return distances, bound.reshape(num_points + 1, samples_per_point).mean(axis=1)


def waveform_extrema(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the strict local maxima (peaks) and minima (valleys) of a sampled waveform."""
    v = np.asarray(values)
    left, mid, right = v[:-2], v[1:-1], v[2:]
    peaks = np.nonzero((mid > left) & (mid >= right))[0] + 1
    valleys = np.nonzero((mid < left) & (mid <= right))[0] + 1
    return peaks, valleys


def _mean_nearest(points: np.ndarray, targets: np.ndarray) -> float:
    """Mean distance from each of ``points`` to its nearest element of sorted ``targets``."""
    if len(points) == 0 or len(targets) == 0:
        return math.inf
    if len(targets) == 1:
        return float(np.abs(points - targets[0]).mean())
    idx = np.clip(np.searchsorted(targets, points), 1, len(targets) - 1)
    nearest = np.minimum(np.abs(points - targets[idx - 1]), np.abs(points - targets[idx]))
    return float(nearest.mean())


def peak_valley_distance(
    peaks: np.ndarray, valleys: np.ndarray, other_peaks: np.ndarray, other_valleys: np.ndarray
) -> float:
    """``d``: mean distance from peaks to the other curve's valleys plus from valleys to its peaks."""
    return _mean_nearest(peaks, other_valleys) + _mean_nearest(valleys, other_peaks)


class _WaveformTable:
    """Waveforms and their extrema for a fixed set of bases, computed once."""

    def __init__(self, bases: Sequence[float], head_dim: int, target_length: int, num_points: int,
                 samples_per_point: int):
        self.values: dict[float, np.ndarray] = {}
        for b in bases:
            self.distances, self.values[b] = attention_waveform(
                b, head_dim=head_dim, target_length=target_length, num_points=num_points,
                samples_per_point=samples_per_point,
            )
        self.extrema = {b: self._positions(v) for b, v in self.values.items()}

    def _positions(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peaks, valleys = waveform_extrema(values)
        return self.distances[peaks], self.distances[valleys]

    def set_extrema(self, members: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        return self._positions(np.mean([self.values[b] for b in members], axis=0))


def _peak_valley_search(num_bases, base_min, base_max, stride, head_dim, target_length, num_points,
                        samples_per_point) -> list[float]:
    count = int(math.floor((base_max - base_min) / stride + 1e-9))
    candidates = [base_min + i * stride for i in range(1, count + 1)]
    if len(candidates) + 1 < num_bases:
        raise ValueError(
            f"peak_valley needs {num_bases} bases but ({base_min:g}, {base_max:g}] with stride "
            f"{stride:g} has only {len(candidates)} candidates besides base_min: lower the stride "
            f"or widen [base_min, base_max]"
        )
    table = _WaveformTable([base_min, *candidates], head_dim, target_length, num_points, samples_per_point)
    selected = [base_min]
    remaining = list(candidates)
    while len(selected) < num_bases:
        set_peaks, set_valleys = table.set_extrema(selected)
        scores = [peak_valley_distance(*table.extrema[b], set_peaks, set_valleys) for b in remaining]
        best = int(np.argmin(scores))  # first minimum: ties go to the smaller base
        selected.append(remaining.pop(best))
    return sorted(selected)


def select_bases(
    num_bases: int,
    strategy: str,
    base_min: float,
    base_max: float,
    *,
    head_dim: int,
    target_length: int,
    stride: float = 30000,
    descending: bool = False,
    num_points: int = DEFAULT_NUM_POINTS,
    samples_per_point: int = DEFAULT_SAMPLES_PER_POINT,
) -> list[float]:
    """One RoPE base per head (query group), in head order.

    ``uniform`` and ``geometric`` are ascending (descending with ``descending=True``); ``peak_valley``
    returns its selection sorted ascending, as the paper's Table 2 lists it (descending if asked).
    """
    if not isinstance(num_bases, int) or num_bases < 1:
        raise ValueError(f"num_bases must be a positive integer (one base per query group), got {num_bases!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown base strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    _check_positive_finite("base_min", base_min)
    _check_positive_finite("base_max", base_max)
    if base_max < base_min:
        raise ValueError(f"base_max ({base_max:g}) must be >= base_min ({base_min:g})")
    _check_head_dim(head_dim)
    if not isinstance(target_length, int) or target_length < 1:
        raise ValueError(f"target_length must be a positive integer (tokens), got {target_length!r}")

    if strategy == "uniform":
        span = base_max - base_min
        bases = [base_min + h * span / (num_bases - 1) if num_bases > 1 else base_min for h in range(num_bases)]
    elif strategy == "geometric":
        ratio = (base_max / base_min) ** (1.0 / (num_bases - 1)) if num_bases > 1 else 1.0
        bases = [base_min * ratio**h for h in range(num_bases)]
    else:
        _check_positive_finite("stride", stride)
        bases = _peak_valley_search(num_bases, float(base_min), float(base_max), float(stride), head_dim,
                                    target_length, num_points, samples_per_point)
    return sorted(bases, reverse=True) if descending else bases


def waveform_ripple(
    bases: Sequence[float],
    *,
    head_dim: int,
    target_length: int,
    num_points: int = DEFAULT_NUM_POINTS,
    samples_per_point: int = DEFAULT_SAMPLES_PER_POINT,
) -> float:
    """How well a set's peaks and valleys interleave: total variation of the set's mean waveform.

    When one head's peaks sit in another's valleys the heads' mean waveform is flatter, so its total
    variation ``sum_i |W(m_{i+1}) - W(m_i)|`` is smaller; lower is better. This is the measure by which
    ``peak_valley`` is compared with ``uniform`` (for Llama-2-7B at 131072 tokens: see the README).
    """
    if len(bases) == 0:
        raise ValueError("waveform_ripple needs at least one base")
    table = _WaveformTable(sorted({float(b) for b in bases}), head_dim, target_length, num_points,
                           samples_per_point)
    mean_waveform = np.mean([table.values[float(b)] for b in bases], axis=0)
    return float(np.abs(np.diff(mean_waveform)).sum())


def parse_bases(text: str) -> list[float]:
    """Parse ``"1e6,2.5e6,..."`` (commas and/or spaces) or a preset name such as ``paper-llama2-7b``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty base list: give comma-separated numbers (e.g. '1e6,2.5e6') or a preset "
                         f"({', '.join(PRESETS)})")
    key = text.strip().lower()
    if key in PRESETS:
        return list(PRESETS[key])
    bases = []
    for token in text.replace(",", " ").split():
        try:
            value = float(token)
        except ValueError:
            raise ValueError(
                f"cannot read {token!r} as a RoPE base: give comma-separated numbers (e.g. '1e6,2.5e6') "
                f"or a preset ({', '.join(PRESETS)})"
            ) from None
        _check_positive_finite("every RoPE base", value)
        bases.append(value)
    return bases


def validate_bases(bases: Sequence[float], num_query_groups: int) -> list[float]:
    """Check one positive finite base per query group; return them as floats."""
    bases = [float(b) for b in bases]
    if len(bases) != num_query_groups:
        raise ValueError(
            f"HARPE needs one RoPE base per query group: got {len(bases)} bases for {num_query_groups} "
            f"query groups (num_query_groups, or num_attention_heads without GQA); give exactly "
            f"{num_query_groups} bases or let a strategy choose them"
        )
    for h, b in enumerate(bases):
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"RoPE base for query group {h} is {b!r}: every base must be positive and finite")
    return bases
