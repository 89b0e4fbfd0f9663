#!/usr/bin/env python
"""Start-up cost of every command: ``--help`` wall time and peak memory, as ratios to a bare ``python -c pass``.

    python benchmarks/startup.py [--repeat 3] [--only select_bases,harpe_demo]

Each command runs in a fresh interpreter, the way a user starts it, ``--repeat`` times; the median wall time and the
largest peak resident set size (the child's own ``ru_maxrss``) are reported. Two reference rows: the bare interpreter
(the 1.0x of the ratios) and ``import megatron_harpe.model`` (torch + megatron's model code: what ``--help`` cost
while the package root imported it). Prints a table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands() -> list[tuple[str, list[str]]]:
    tools = sorted((ROOT / "tools").glob("*.py"))
    rows = [(f"tools/{p.name} --help", [str(p), "--help"]) for p in tools]
    return rows + [("pretrain_harpe.py --help", [str(ROOT / "pretrain_harpe.py"), "--help"])]


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit status) of one run of ``python argv``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def repeated(argv: list[str], repeat: int) -> tuple[float, float, int]:
    runs = [measure(argv) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (median time, largest memory)")
    parser.add_argument("--only", help="comma-separated names to keep (substrings of the row labels)")
    args = parser.parse_args(argv)
    rows = commands()
    if args.only:
        keep = args.only.split(",")
        rows = [r for r in rows if any(k in r[0] for k in keep)]
    base_wall, base_rss, _ = repeated(["-c", "pass"], args.repeat)
    reference = [("python -c pass", ["-c", "pass"]), ("import megatron_harpe.model", ["-c", "import megatron_harpe.model"])]
    lines = []
    for label, command in reference + rows:
        wall, rss, status = repeated(command, args.repeat)
        note = "" if status == 0 else f" (exit {status})"
        lines.append(f"| {label}{note} | {wall:.2f} | {wall / base_wall:.1f}x | {rss:.0f} | {rss / base_rss:.1f}x |")
        print(lines[-1], flush=True)
    print()
    print(f"{args.repeat} runs each; baseline python -c pass: {base_wall:.3f} s, {base_rss:.0f} MiB")
    print("| command | wall (s, median) | vs python | peak RSS (MiB) | vs python |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
