#!/usr/bin/env python
"""How long choosing HARPE bases takes: peak-valley search (Algorithm 1) beside the closed-form strategies.

    python benchmarks/bases.py

Llama-2's grid (1M..5M, stride 30k, head_dim 128, 131072 tokens) at 8, 32 and 64 bases; seconds per call (best of
``--repeat``) and the ratio to ``uniform``. Prints a table last.
"""

from __future__ import annotations

import argparse
import time

LLAMA = dict(head_dim=128, target_length=131072)


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="calls per row; the best is reported")
    parser.add_argument("--num-bases", default="8,32,64", help="comma-separated counts")
    args = parser.parse_args(argv)
    from megatron_harpe.bases import select_bases

    rows = []
    for n in (int(v) for v in args.num_bases.split(",")):
        uniform = best_time(lambda: select_bases(n, "uniform", 1e6, 5e6, **LLAMA), args.repeat)
        search = best_time(lambda: select_bases(n, "peak_valley", 1e6, 5e6, stride=30000, **LLAMA), args.repeat)
        rows.append(f"| {n} | {search:.2f} | {uniform * 1e3:.3f} | {search / uniform:.0f}x |")
    print("| bases | peak_valley (s) | uniform (ms) | peak_valley / uniform |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
