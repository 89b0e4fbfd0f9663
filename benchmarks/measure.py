"""Shared by the benchmarks: run a command as its own process tree and record wall time and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_tree_pss(process: psutil.Popen, interval: float = 0.05) -> int:
    """Peak proportional set size of a process and its children (forked workers' shared pages counted once)."""
    peak = 0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(interval)
    return peak


def run_measured(command: list) -> dict:
    """``{"wall_s", "peak_pss_mib"}`` of ``command`` (python warnings off); raises with its stderr on failure."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    process = psutil.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                           cwd=REPO)
    peak = peak_tree_pss(process)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{process.stderr.read().decode()[-3000:]}")
    return {"wall_s": wall, "peak_pss_mib": peak / 2**20}


PYTHON = sys.executable
