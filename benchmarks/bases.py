#!/usr/bin/env python
"""Choosing HARPE bases: how long the peak-valley search takes, and how close it lands to the paper's Table 2.

    python benchmarks/bases.py               # timing, then the Table 2 comparison
    python benchmarks/bases.py --no-timing   # the Table 2 comparison only

Llama-2-7B's grid (1M..5M, stride 30k, head_dim 128, 131072 tokens). Timing: seconds per call (best of ``--repeat``) at
8, 32 and 64 bases and the ratio to ``uniform``. Table 2: values our peak-valley list shares with the paper's (as sets),
positions that match in the two sorted lists, and the same two counts for random lists drawn from the same stride grid
(``--draws`` seeded draws), which is what chance agreement looks like.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LLAMA = dict(head_dim=128, target_length=131072)
BASE_MIN, BASE_MAX, STRIDE = 1e6, 5e6, 30000


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timing_table(counts: list[int], repeat: int) -> list[str]:
    from megatron_harpe.bases import select_bases

    rows = ["| bases | peak_valley (s) | uniform (ms) | peak_valley / uniform |", "|---|---|---|---|"]
    for n in counts:
        uniform = best_time(lambda: select_bases(n, "uniform", BASE_MIN, BASE_MAX, **LLAMA), repeat)
        search = best_time(lambda: select_bases(n, "peak_valley", BASE_MIN, BASE_MAX, stride=STRIDE, **LLAMA), repeat)
        rows.append(f"| {n} | {search:.2f} | {uniform * 1e3:.3f} | {search / uniform:.0f}x |")
    return rows


def agreement(bases, reference) -> tuple[int, int]:
    """(values shared as sets, equal positions of the two sorted lists)."""
    shared = len(set(bases) & set(reference))
    positions = sum(a == b for a, b in zip(sorted(bases), sorted(reference)))
    return shared, positions


def table2_comparison(draws: int, seed: int) -> list[str]:
    from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, select_bases, waveform_ripple

    paper = [float(b) for b in PAPER_LLAMA2_7B_BASES]
    n = len(paper)
    ours = select_bases(n, "peak_valley", BASE_MIN, BASE_MAX, stride=STRIDE, **LLAMA)
    # Algorithm 1's candidates: b_min + i * stride on (b_min, b_max]; every list, Table 2's too, starts from b_min.
    grid = BASE_MIN + STRIDE * np.arange(1, int((BASE_MAX - BASE_MIN) // STRIDE) + 1)
    assert set(paper) <= {BASE_MIN, *grid.tolist()}, "Table 2 is no longer on the stride grid"
    rng = np.random.default_rng(seed)
    chance = np.array([agreement([BASE_MIN, *rng.choice(grid, n - 1, replace=False).tolist()], paper)
                       for _ in range(draws)])
    shared, positions = agreement(ours, paper)
    diff = np.abs(np.array(sorted(ours)) - np.array(sorted(paper)))
    uniform = select_bases(n, "uniform", BASE_MIN, BASE_MAX, **LLAMA)
    ripple = {name: waveform_ripple(b, **LLAMA) for name, b in (("peak_valley", ours), ("uniform", uniform),
                                                               ("Table 2", paper))}
    # Expected overlap of n - 1 picks from the grid with Table 2's n - 1 grid values (hypergeometric), plus b_min.
    expected = 1 + (n - 1) ** 2 / len(grid)
    return [
        f"Table 2 (Llama-2-7B, {n} bases, {BASE_MIN:g}..{BASE_MAX:g}, stride {STRIDE}, {len(grid)} grid candidates "
        f"besides b_min)",
        f"  ours (peak_valley): shares {shared} of {n} values with Table 2, {positions} equal position(s) "
        f"of the sorted lists; mean |difference| {diff.mean() / 1e6:.2f}M (max {diff.max() / 1e6:.2f}M); "
        f"median {np.median(ours) / 1e6:.3f}M vs {np.median(paper) / 1e6:.3f}M",
        f"  chance ({draws} seeded draws of b_min + {n - 1} grid values, seed {seed}): shares "
        f"{chance[:, 0].mean():.2f} +- {chance[:, 0].std():.2f} (exact expectation {expected:.2f}), "
        f"{chance[:, 1].mean():.2f} equal positions; draws sharing >= {shared}: {(chance[:, 0] >= shared).mean():.0%}",
        "  waveform_ripple (lower: peaks fill valleys): "
        + ", ".join(f"{name} {value:.1f}" for name, value in ripple.items()),
        "  ours: " + ",".join(f"{b / 1e6:.2f}" for b in sorted(ours)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="calls per timing row; the best is reported")
    parser.add_argument("--num-bases", default="8,32,64", help="comma-separated counts to time")
    parser.add_argument("--no-timing", action="store_true", help="print the Table 2 comparison only")
    parser.add_argument("--draws", type=int, default=10000, help="random lists for the chance baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = table2_comparison(args.draws, args.seed)
    if not args.no_timing:
        lines = timing_table([int(v) for v in args.num_bases.split(",")], args.repeat) + [""] + lines
    print("\n".join(lines))


if __name__ == "__main__":
    main()
