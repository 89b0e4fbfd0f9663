"""Shared by the benchmarks: run a command as its own process tree and record wall time and peak memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_anon(pid: int) -> int:
    """Resident anonymous memory of one process in bytes (``RssAnon`` of /proc/<pid>/status): what it allocated,
    without the page-cache pages of files it maps, which the kernel can reclaim."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_tree_memory(process: psutil.Popen, interval: float = 0.05, pss_share: float = 0.1) -> tuple[int, int]:
    """Peak proportional set size and peak anonymous resident memory of a process and its children (forked
    workers' shared pages counted once in PSS; anonymous memory summed over the tree).

    Anonymous memory is a counter, read every ``interval`` s. PSS walks the page tables (40 ms for a 6 GB process):
    read as often as keeps that walk under ``pss_share`` of one core, so that on a small machine the sampler does
    not slow the job it measures."""
    peak_pss = peak_anon = 0
    next_pss = 0.0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak_anon = max(peak_anon, sum(rss_anon(p.pid) for p in tree if p.is_running()))
            start = time.perf_counter()
            if start >= next_pss:
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree if p.is_running()))
                next_pss = start + (time.perf_counter() - start) / pss_share
        except (psutil.Error, OSError):
            pass  # a worker that exited between listing and reading
        time.sleep(interval)
    return peak_pss, peak_anon


def run_measured(command: list) -> dict:
    """``{"wall_s", "peak_pss_mib", "peak_anon_mib", "user_s", "sys_s", "minor_faults"}`` of ``command`` (python
    warnings off; CPU times and page faults of the process and the children it waited for); raises with its
    stderr on failure."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty job must not block on a full pipe
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = psutil.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=REPO)
        peak_pss, peak_anon = peak_tree_memory(process)
        wall = time.perf_counter() - start  # poll() has reaped it: its usage is in RUSAGE_CHILDREN now
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{stderr.read().decode()[-3000:]}")
    return {"wall_s": wall, "peak_pss_mib": peak_pss / 2**20, "peak_anon_mib": peak_anon / 2**20,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt}


PYTHON = sys.executable
