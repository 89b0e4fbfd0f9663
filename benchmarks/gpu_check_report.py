#!/usr/bin/env python
r"""The two Python halves of ``benchmarks/gpu_check.sh``: the environment header and the final table.

    python benchmarks/gpu_check_report.py env            # GPU, torch, TE, megatron-core; exit 2 without CUDA
    python benchmarks/gpu_check_report.py table OUTDIR   # OUTDIR/steps.tsv + the step logs -> one table

``gpu_check.sh`` appends one line per step to ``OUTDIR/steps.tsv`` (tab-separated: kind, name, exit status,
seconds, time limit, log file, artifact file, expectations; exit status -1: the step did not run, -2: Ctrl-C
stopped it; expectations: ``key=value,...`` the log must bear out, e.g. ``spec=local,kernel=triton``) and keeps
each step's full output in its log. ``table`` turns every step into one or more rows (check | status | key numbers
| seconds | log), prints them as a Markdown table, writes ``summary.md`` and ``summary.json`` beside the logs and
exits 1 if any row failed. Only the standard library is imported here, so the table comes out whatever broke.

The log formats parsed are megatron-core 0.19's (``megatron/training/training.py`` ``training_log``,
``megatron/training/utils/common_utils.py`` ``report_memory``, ``theoretical_memory_usage.py``), pytest's
summary line and its ``-rA`` outcome lines (``PASSED tests/x.py::test``), and two lines ``pretrain_harpe.py``
prints once (rank 0): the layer spec when it builds the model (``megatron_harpe/model_from_args.py``) and
the HARPE RoPE kernel at its first call (``megatron_harpe/kernels/__init__.py``), each at the start of a line
(after torchrun's ``[rankN]: `` where it adds one):

    layer spec: <spec> (free text)      <spec>: transformer_engine | local; SPEC_LINE, ^layer spec: (\S+)
    HARPE RoPE kernel: <kernel> (...)   <kernel>: triton | torch | unfused; KERNEL_LINE,
                                        ^HARPE RoPE kernel: ([\w.-]+) (a quoted mention inside a line is not
                                        one); only HARPE runs print it (a standard-RoPE run prints no such line,
                                        or the kernel 'none')

A pretrain row fails if its expected spec (``spec=``) or kernel (``kernel=``; ``none`` for standard RoPE) is not
what the log says, or the line is missing from a run that finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata

# --- environment header --------------------------------------------------------------------------------------------

NO_CUDA = ("error: no CUDA GPU visible (torch.cuda.is_available() is False{why}): run gpu_check.sh on a machine "
           "with a GPU, or pass --dry-run to print its commands")


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment() -> tuple[dict, bool]:
    """(header fields, CUDA usable). Never raises: what cannot be read says why."""
    info: dict[str, str] = {"python": f"{sys.executable} ({sys.version.split()[0]})"}
    cuda = False
    try:
        import torch

        info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
        cuda = torch.cuda.is_available()
        if cuda:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = (f"{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
                           f"compute capability {props.major}.{props.minor}, {torch.cuda.device_count()} visible")
    except Exception as e:  # a broken torch install is exactly what this header must show
        info["torch"] = f"not importable: {type(e).__name__}: {e}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            info["nvidia-smi"] = "; ".join(line.strip() for line in smi.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    te = _version("transformer_engine", "transformer-engine", "transformer_engine_torch")
    if te is None:
        try:
            import transformer_engine

            te = getattr(transformer_engine, "__version__", "installed (version unknown)")
        except Exception:
            te = "not installed (local layer spec; the TE RoPE baseline is skipped)"
    info["transformer-engine"] = te
    info["megatron-core"] = _version("megatron-core", "megatron_core") or "not installed"
    for name, dists in (("triton", ("triton", "pytorch-triton")), ("flash-attn", ("flash_attn", "flash-attn")),
                        ("liger-kernel", ("liger_kernel", "liger-kernel")), ("nltk", ("nltk",)), ("apex", ("apex",))):
        info[name] = _version(*dists) or "not installed"
    if os.environ.get("PYTHONPATH"):
        info["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return info, cuda


def cmd_env(_args) -> int:
    info, cuda = environment()
    for key, value in info.items():
        print(f"{key + ':':20s}{value}")
    if not cuda:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        print(NO_CUDA.format(why=why), file=sys.stderr)
        return 2
    return 0


# --- parsing logs --------------------------------------------------------------------------------------------------

# training_log: ' iteration {:8d}/{:8d} |' ... ' elapsed time per iteration (ms): {:.1f} |' ...
# ' throughput per GPU (TFLOP/s/GPU): {:.1f} |' ... ' {key}: {:.6E} |' (key 'lm loss' from our forward_step)
ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|")
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+) \|")
THROUGHPUT = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+) \|")
LM_LOSS = re.compile(r" lm loss: ([-+0-9.eEnaif]+) \|")
# report_memory: '[Rank {}] {name} memory (MB) | allocated: {:.2f} | max allocated: {:.2f} | reserved: {:.2f} |
# max reserved: {:.2f}' with name '(after {iteration} iterations)'
MEMORY = re.compile(r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\) \| allocated: ([0-9.]+) \| "
                    r"max allocated: ([0-9.]+) \| reserved: ([0-9.]+) \| max reserved: ([0-9.]+)")
# report_theoretical_memory: 'Theoretical memory footprints: weight and optimizer={:.2f} MB, activation={:.2f} MB,
# total={:.2f} MB'
THEORETICAL = re.compile(r"Theoretical memory footprints: weight and optimizer=([0-9.]+) MB, "
                         r"activation=([0-9.]+) MB, total=([0-9.]+) MB")
# pytest: '2 passed, 150 deselected in 61.20s (0:01:01)' (with -q), or the same between '=' rules
PYTEST_SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [0-9.]+s")
# an exception line ('torch.OutOfMemoryError: CUDA out of memory...', '[rank0]: AssertionError: ...'), an argparse
# or HARPE error ('pretrain_harpe.py: error: ...'), or pytest's 'FAILED tests/x.py::test - ...'
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?([\w.]*(Error|Exception|Interrupt)\b:?|\S+: error: |FAILED )")
ERROR_WORD = re.compile(r"\berror\b|\bKilled\b|out of memory", re.IGNORECASE)
# pytest -rA: 'PASSED tests/x.py::test[param]', 'FAILED tests/x.py::test - why', 'ERROR tests/x.py::test - why'
PYTEST_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL) (\S+)(?: - (.*))?$")
PYTEST_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$")
# The gpu test of the Triton kernel's 64-bit offsets (a fused-QKV-sized view past 2^31 elements): a test in
# tests/kernels whose name says so.
OFFSET64_TEST = re.compile(r"^tests/kernels/[^:\s]+::\S*?(64|offset|overflow|2_?31|large|huge)", re.IGNORECASE)
# What pretrain_harpe.py says it built (see the module docstring).
SPEC_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?layer spec: (\S+)", re.MULTILINE)
KERNEL_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?HARPE RoPE kernel: ([\w.-]+)", re.MULTILINE)
NOT_A_CAUSE = ("ChildFailedError", "warnings.warn", "Warning:")

MEDIAN_FROM = 6  # iterations 1..5 include start-up, Triton/cuDNN compilation and allocator warm-up


def last_error(text: str, width: int = 200) -> str:
    """The root cause a log ends with: its last exception line (not torchrun's ChildFailedError wrapper), else its
    last line mentioning an error, else its last line; shortened to ``width``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (EXCEPTION_LINE.search, ERROR_WORD.search):
        for line in reversed(lines):
            if pattern(line) and not any(s in line for s in NOT_A_CAUSE):
                return line[:width]
    return lines[-1][:width] if lines else "(empty log)"


def parse_pytest(text: str) -> dict[str, int] | None:
    """Counts from pytest's final summary line: {'passed': 2, 'skipped': 1, ...}; None without one."""
    counts = None
    for line in text.splitlines():
        m = PYTEST_SUMMARY.match(line.strip())
        if m:
            counts = {}
            for part in m.group(1).split(", "):
                number, word = part.split(" ", 1)
                word = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[word] = counts.get(word, 0) + int(number)
    return counts


def parse_pytest_outcomes(text: str) -> dict[str, tuple[str, str]]:
    """``{node id: (outcome, why)}`` from pytest's ``-rA`` short summary (PASSED, FAILED, ERROR, XPASS, XFAIL)."""
    outcomes = {}
    for line in text.splitlines():
        m = PYTEST_OUTCOME.match(line.strip())
        if m:
            outcomes[m.group(2)] = (m.group(1), m.group(3) or "")
    return outcomes


def parse_announcements(text: str) -> dict[str, list[str]]:
    """The values of every ``layer spec:`` and ``HARPE RoPE kernel:`` line, in order."""
    return {"spec": SPEC_LINE.findall(text), "kernel": KERNEL_LINE.findall(text)}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_megatron_log(text: str) -> dict:
    """Iterations, losses, times and memory from a ``megatron.training.pretrain`` log (rank 0's lines)."""
    iterations: dict[int, dict] = {}
    train_iters = None
    memory = []
    theoretical = None
    for line in text.splitlines():
        it = ITERATION.search(line)
        if it and "elapsed time per iteration" in line:
            i, train_iters = int(it.group(1)), int(it.group(2))
            record = {"ms": _float(ELAPSED.search(line).group(1)) if ELAPSED.search(line) else math.nan}
            if (loss := LM_LOSS.search(line)) is not None:
                record["loss"] = _float(loss.group(1))
            if (tflops := THROUGHPUT.search(line)) is not None:
                record["tflops"] = _float(tflops.group(1))
            iterations[i] = record
        if (mem := MEMORY.search(line)) is not None:
            memory.append({"rank": int(mem.group(1)), "iteration": int(mem.group(2)),
                           "allocated": float(mem.group(3)), "max_allocated": float(mem.group(4)),
                           "reserved": float(mem.group(5)), "max_reserved": float(mem.group(6))})
        if (th := THEORETICAL.search(line)) is not None:
            theoretical = {"weight_and_optimizer": float(th.group(1)), "activation": float(th.group(2)),
                           "total": float(th.group(3))}
    steady = [r["ms"] for i, r in sorted(iterations.items()) if i >= MEDIAN_FROM and math.isfinite(r["ms"])]
    tflops = [r["tflops"] for i, r in sorted(iterations.items()) if i >= MEDIAN_FROM and "tflops" in r]
    last_iteration = max(iterations) if iterations else 0
    return {
        "train_iters": train_iters,
        "last_iteration": last_iteration,
        "iterations": iterations,
        "median_ms": statistics.median(steady) if steady else None,
        "median_tflops": statistics.median(tflops) if tflops else None,
        "loss_first": iterations.get(1, {}).get("loss"),
        "loss_last": iterations.get(last_iteration, {}).get("loss") if iterations else None,
        # max_memory_allocated is never reset by megatron: the last report holds the peak of the whole run
        "peak_allocated_mib": max((m["max_allocated"] for m in memory), default=None),
        "peak_reserved_mib": max((m["max_reserved"] for m in memory), default=None),
        "theoretical_mib": theoretical,
    }


# --- rows ----------------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One line of steps.tsv."""
    kind: str
    name: str
    rc: int
    seconds: int
    limit: int
    log: str
    artifact: str = ""
    expect: str = ""

    def expectations(self) -> dict[str, str]:
        """``spec=local,kernel=triton`` -> {'spec': 'local', 'kernel': 'triton'}."""
        pairs = (item.partition("=") for item in self.expect.split(",") if item.strip())
        return {key.strip(): value.strip() for key, _, value in pairs}

    def read_log(self, outdir: str) -> str:
        try:
            with open(os.path.join(outdir, self.log), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def failure(self, text: str) -> str:
        if self.rc == -1:
            return "not run (interrupted)"
        if self.rc == -2:
            return "interrupted (Ctrl-C or SIGTERM) while running"
        if self.rc in (124, 137):
            return f"timed out after {self.limit} s"
        return f"exit {self.rc}: {last_error(text)}"


@dataclass
class Row:
    check: str
    status: str  # PASS | FAIL | SKIP
    numbers: str
    seconds: int | None = None
    log: str = ""
    data: dict = field(default_factory=dict)


def read_steps(outdir: str) -> list[Step]:
    steps = []
    path = os.path.join(outdir, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                continue
            kind, name, rc, seconds, limit, log, *rest = parts
            steps.append(Step(kind, name, int(rc), int(seconds), int(limit), log, rest[0] if rest else "",
                              rest[1] if len(rest) > 1 else ""))
    return steps


def _skipped(step: Step) -> Row | None:
    if step.rc == -1:
        return Row(step.name, "SKIP", "not run (interrupted)", None, step.log)
    return None


def rows_pytest(step: Step, outdir: str, context: dict) -> list[Row]:
    """The summary of ``pytest -m gpu`` and a row for the Triton kernel's 64-bit-offset test (OFFSET64_TEST)."""
    if (row := _skipped(step)) is not None:
        return [row, Row("rope kernel 64-bit offsets (pytest)", "SKIP", "not run (interrupted)", None, step.log)]
    text = step.read_log(outdir)
    return _rows_pytest_summary(step, text) + [_row_offset64(step, text)]


def _row_offset64(step: Step, text: str) -> Row:
    name = "rope kernel 64-bit offsets (pytest)"
    tests = {node: outcome for node, outcome in parse_pytest_outcomes(text).items() if OFFSET64_TEST.match(node)}
    if not tests:
        skipped = [f"{m.group(1)}: {m.group(2)}" for m in map(PYTEST_SKIPPED.match, map(str.strip, text.splitlines()))
                   if m and m.group(1).startswith("tests/kernels/")]
        why = f"; skipped in tests/kernels: {'; '.join(skipped)[:200]}" if skipped else ""
        return Row(name, "FAIL", "no gpu test of the kernel's 64-bit offsets ran (a test in tests/kernels named "
                   f"*64*/*offset*/*overflow*/*2_31*/*large*){why}", None, step.log)
    bad = {node: outcome for node, outcome in tests.items() if outcome[0] not in ("PASSED", "XFAIL")}
    if bad:
        return Row(name, "FAIL", "; ".join(f"{outcome} {node}{' - ' + why if why else ''}"[:200]
                                           for node, (outcome, why) in bad.items()), None, step.log)
    return Row(name, "PASS", "passed: " + ", ".join(node.split("::", 1)[1] for node in tests), None, step.log,
               {"tests": sorted(tests)})


def _rows_pytest_summary(step: Step, text: str) -> list[Row]:
    counts = parse_pytest(text) or {}
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
    if step.rc != 0 and not (counts.get("failed", 0) or counts.get("errors", 0)) or not counts:
        why = step.failure(text)  # timed out, interrupted, or failed outside a test (collection, usage)
        return [Row(step.name, "FAIL", f"{summary}; {why}" if counts else why, step.seconds, step.log, counts)]
    if counts.get("failed", 0) or counts.get("errors", 0) or not counts.get("passed", 0):
        failed = [line.strip()[:160] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        why = "; ".join(failed[:3]) or ("no GPU test ran" if not counts.get("passed", 0) else step.failure(text))
        return [Row(step.name, "FAIL", f"{summary}: {why}", step.seconds, step.log, counts)]
    return [Row(step.name, "PASS", summary, step.seconds, step.log, counts)]


ROPE_TIME_TARGET, ROPE_BANDWIDTH_TARGET = 1.10, 0.70  # issue 3: <= 1.10x TE fused RoPE, >= 70 % of peak bandwidth


def _ratio_text(label: str, ratio: float | None, target: float | None = None) -> str:
    if target is None:
        return f"{label} {ratio:.2f}x"
    return f"{label} {ratio:.2f}x ({'met' if ratio <= target else 'MISSED'} <= {target:.2f})"


def _rows_kernel_check(r: dict, log: str) -> list[Row]:
    check = r.get("check triton/torch")
    if check is None:
        return []
    errors = ", ".join(f"{k} {v:.1e}" for k, v in check["errors"].items())
    ok = check["ok"] and all(math.isfinite(v) for v in check["errors"].values())
    return [Row(f"rope kernel s={r['seq']} {r['dtype']}: Triton vs torch", "PASS" if ok else "FAIL",
                f"max error / max input: {errors} ({'within' if ok else 'OVER'} {check['tolerance']:.1e})",
                None, log, check)]


def _row_rope_timing(r: dict, log: str) -> Row:
    parts, problems = [], []
    te, liger = r.get("time harpe/TE"), r.get("time harpe/liger")
    if te is not None:
        parts.append(_ratio_text("fwd+bwd HARPE/TE fused", te, ROPE_TIME_TARGET))
    if liger is not None:
        parts.append(_ratio_text("HARPE/Liger", liger, ROPE_TIME_TARGET))
        check = r.get("check liger/std")
        if check is not None and not (check["ok"] and all(math.isfinite(v) for v in check["errors"].values())):
            worst = max(check["errors"].values(), key=lambda v: v if math.isfinite(v) else math.inf)
            problems.append(f"Liger's RoPE differs from megatron's standard RoPE (max error / max input {worst:.1e} > "
                            f"{check['tolerance']:.1e}): its time is not of the same operation")
    parts.append(_ratio_text("HARPE/unfused std", r["time harpe/std"]))
    parts.append(f"saved bytes HARPE/std {r['saved harpe/std']:.3f}")
    bandwidth = f"{r['GB/s']:.0f} GB/s"
    if r.get("of peak") is not None:
        met = "met" if r["of peak"] >= ROPE_BANDWIDTH_TARGET else "MISSED"
        bandwidth += f" = {r['of peak']:.0%} of peak ({met} >= {ROPE_BANDWIDTH_TARGET:.0%})"
    parts.append(bandwidth)
    ms = r.get("ms") or {}
    names = (("harpe", "HARPE"), ("liger_standard", "Liger"), ("te_fused_standard", "TE"), ("standard", "std"))
    if "harpe" in ms:
        parts.append("ms: " + ", ".join(f"{label} {ms[key]:.2f}" for key, label in names if key in ms))
    return Row(f"rope s={r['seq']} {r['dtype']}", "FAIL" if problems else "PASS", "; ".join(problems + parts),
               None, log, r)


BASELINE_NAMES = {"te_fused_standard": "rope baseline: TE fused RoPE", "liger_standard": "rope baseline: Liger RoPE"}


def rows_rope(step: Step, outdir: str, context: dict) -> list[Row]:
    """benchmarks/rope.py --json: per (sequence length, dtype) the Triton-vs-torch kernel check (with
    --check-kernels) and the timings; a SKIP row per baseline that could not run; the model step."""
    if (row := _skipped(step)) is not None:
        return [row]
    text = step.read_log(outdir)
    try:
        with open(os.path.join(outdir, step.artifact)) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return [Row(step.name, "FAIL", f"no results ({step.failure(text) if step.rc else 'no JSON written'})",
                    step.seconds, step.log)]
    rows = []
    for r in result.get("rows", []):
        rows.extend(_rows_kernel_check(r, step.log))
        rows.append(_row_rope_timing(r, step.log))
    for name, why in (result.get("missing") or {}).items():
        rows.append(Row(BASELINE_NAMES.get(name, f"rope baseline: {name}"), "SKIP", f"not measured: {why}", None,
                        step.log))
    model = result.get("model_step")
    if model is not None:
        sec = model["seconds"]
        spec = f", {model['impl']} spec" if model.get("impl") else ""
        rows.append(Row("rope model step", "PASS", f"HarpeGPTModel/GPTModel {model['ratio']:.3f} "
                        f"({sec['harpe'] * 1e3:.0f} vs {sec['standard'] * 1e3:.0f} ms; 4 layers, seq 1024{spec})",
                        None, step.log, model))
    if step.rc != 0:
        measured = f" (after {len(rows)} rows above)" if rows else ""
        rows.append(Row(step.name, "FAIL", step.failure(text) + measured, None, step.log))
    if rows:
        rows[-1].seconds = step.seconds
    return rows or [Row(step.name, "FAIL", "the JSON holds no rows", step.seconds, step.log)]


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f} GiB"


def rows_pretrain(step: Step, outdir: str, context: dict) -> list[Row]:
    """kind 'pretrain:ROLE': one megatron.training run; its parse is kept in context['pretrain'][ROLE]."""
    if (row := _skipped(step)) is not None:
        return [row]
    text = step.read_log(outdir)
    run = parse_megatron_log(text)
    context.setdefault("pretrain", {})[step.kind.partition(":")[2]] = run
    numbers = []
    if run["median_ms"] is not None:
        numbers.append(f"{run['median_ms']:.0f} ms/iter (median of {MEDIAN_FROM}..{run['last_iteration']})")
    if run["median_tflops"] is not None:
        numbers.append(f"{run['median_tflops']:.0f} TFLOP/s")
    if run["peak_allocated_mib"] is not None:
        numbers.append(f"peak allocated {_gib(run['peak_allocated_mib'])} (reserved {_gib(run['peak_reserved_mib'])})")
    if run["theoretical_mib"] is not None:
        numbers.append(f"Megatron's estimate {_gib(run['theoretical_mib']['total'])}")
    first, last = run["loss_first"], run["loss_last"]
    if first is not None and last is not None:
        numbers.append(f"loss {first:.3f} @1 -> {last:.3f} @{run['last_iteration']}")
    # What the run says it built: the layer spec and (HARPE runs) the RoPE kernel, first among the numbers.
    said = parse_announcements(text)
    run["spec"], run["kernel"] = said["spec"], said["kernel"]
    if said["kernel"]:
        numbers.insert(0, f"HARPE kernel {'/'.join(dict.fromkeys(said['kernel']))}")
    if said["spec"]:
        numbers.insert(0, f"spec {'/'.join(dict.fromkeys(said['spec']))}")
    problems = []
    if step.rc != 0:
        where = f" at iteration {run['last_iteration']}/{run['train_iters']}" if run["iterations"] else ""
        problems.append(step.failure(text) + where)
    problems.extend(_announcement_problems(step.expectations(), said, finished=step.rc == 0))
    if step.rc == 0:
        problems.extend(_finished_run_problems(run))
    status = "FAIL" if problems else "PASS"
    text_out = "; ".join(problems + numbers) if problems else "; ".join(numbers)
    data = {k: v for k, v in run.items() if k != "iterations"}
    return [Row(step.name, status, text_out, step.seconds, step.log, data)]


def _finished_run_problems(run: dict) -> list[str]:
    """What is wrong with a run that exited 0: no iterations, stopped early, loss not falling, no memory report."""
    if not run["iterations"]:
        return ["no iteration logged"]
    problems = []
    first, last = run["loss_first"], run["loss_last"]
    if run["last_iteration"] != run["train_iters"]:
        problems.append(f"stopped at iteration {run['last_iteration']}/{run['train_iters']}")
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)):
        problems.append("loss missing or not finite")
    elif not last < first:
        problems.append("loss did not fall")
    if run["peak_allocated_mib"] is None:
        problems.append("no memory report")
    return problems


def _announcement_problems(expect: dict[str, str], said: dict[str, list[str]], finished: bool) -> list[str]:
    """What the log's 'layer spec:' / 'HARPE RoPE kernel:' lines contradict in the expectations (see the docstring)."""
    problems = []
    spec = expect.get("spec")
    if spec:
        found = set(said["spec"])
        if found and found != {spec}:
            problems.append(f"layer spec {'/'.join(sorted(found))} ran, expected {spec}")
        elif not found and finished:
            problems.append(f"no 'layer spec: ...' line in the log (expected {spec})")
    kernel = expect.get("kernel")
    if kernel == "none":
        found = set(said["kernel"]) - {"none"}
        if found:
            problems.append(f"HARPE RoPE kernel {'/'.join(sorted(found))} in a standard-RoPE run")
    elif kernel:
        found = set(said["kernel"])
        if found and found != {kernel}:
            problems.append(f"HARPE RoPE kernel {'/'.join(sorted(found))} ran, expected {kernel}")
        elif not found and finished:
            problems.append(f"no 'HARPE RoPE kernel: ...' line in the log (expected {kernel})")
    return problems


def rows_pretrain_comparison(context: dict) -> list[Row]:
    """HARPE / standard RoPE: iteration time and peak memory ratios of the two pretrain runs."""
    runs = context.get("pretrain", {})
    if "harpe" not in runs and "standard" not in runs:
        return []
    harpe, standard = runs.get("harpe"), runs.get("standard")
    name = "pretrain HARPE / standard"
    if not harpe or not standard or harpe["median_ms"] is None or standard["median_ms"] is None:
        return [Row(name, "FAIL", "needs both pretrain runs' iteration times")]
    parts = [f"iteration time {harpe['median_ms'] / standard['median_ms']:.3f}x"]
    data = {"time_ratio": harpe["median_ms"] / standard["median_ms"]}
    if harpe["peak_allocated_mib"] and standard["peak_allocated_mib"]:
        data["peak_allocated_ratio"] = harpe["peak_allocated_mib"] / standard["peak_allocated_mib"]
        parts.append(f"peak allocated {data['peak_allocated_ratio']:.3f}x")
    if harpe["loss_last"] is not None and standard["loss_last"] is not None:
        parts.append(f"final loss {harpe['loss_last']:.3f} vs {standard['loss_last']:.3f}")
    return [Row(name, "PASS", "; ".join(parts), None, "", data)]


# The planner's estimate counts as confirmed within this factor of the measured peak allocation.
PLANNER_TOLERANCE = 1.25


def rows_planner(step: Step, outdir: str, context: dict) -> list[Row]:
    """kind 'planner': tools/plan_parallelism.py's estimate (its --json in the artifact) / the HARPE run's peak."""
    if (row := _skipped(step)) is not None:
        return [row]
    if step.rc != 0:
        return [Row(step.name, "FAIL", step.failure(step.read_log(outdir)), step.seconds, step.log)]
    with open(os.path.join(outdir, step.artifact)) as f:
        estimate_mib = json.load(f)["plans"][0]["memory_bytes"]["total"] / 2 ** 20
    measured = context.get("pretrain", {}).get("harpe", {}).get("peak_allocated_mib")
    if not measured:
        return [Row(step.name, "FAIL", f"estimate {_gib(estimate_mib)}; no measured peak from the HARPE run",
                    step.seconds, step.log)]
    ratio = estimate_mib / measured
    ok = 1 / PLANNER_TOLERANCE <= ratio <= PLANNER_TOLERANCE
    return [Row(step.name, "PASS" if ok else "FAIL",
                f"estimate {_gib(estimate_mib)} / peak allocated {_gib(measured)} = {ratio:.3f} "
                f"({'within' if ok else 'outside'} 1/{PLANNER_TOLERANCE}..{PLANNER_TOLERANCE})",
                step.seconds, step.log, {"estimate_mib": estimate_mib, "measured_mib": measured, "ratio": ratio})]


def rows_generic(step: Step, outdir: str, context: dict) -> list[Row]:
    """Any other kind: PASS on exit status 0, key numbers from the log's last line."""
    if (row := _skipped(step)) is not None:
        return [row]
    text = step.read_log(outdir)
    if step.rc != 0:
        return [Row(step.name, "FAIL", step.failure(text), step.seconds, step.log)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [Row(step.name, "PASS", lines[-1][:200] if lines else "", step.seconds, step.log)]


# EXTENSION POINT: a step of kind K in steps.tsv becomes rows through ROW_BUILDERS[K] (the part of K before ':');
# builders run in the order of steps.tsv and share `context` (the pretrain runs' parses are in
# context['pretrain']['harpe' | 'standard'], e.g. 'peak_allocated_mib'), so a later row can set a number next to a
# measured one: add its kind here and a run_step line in gpu_check.sh. Unknown kinds are generic.
ROW_BUILDERS: dict[str, Callable[[Step, str, dict], list[Row]]] = {
    "pytest": rows_pytest,
    "rope": rows_rope,
    "pretrain": rows_pretrain,
    "planner": rows_planner,
    "generic": rows_generic,
}
# Rows computed from several steps, appended after all steps' rows.
SUMMARY_BUILDERS: list[Callable[[dict], list[Row]]] = [rows_pretrain_comparison]


def build_rows(outdir: str) -> list[Row]:
    context: dict = {}
    rows: list[Row] = []
    steps = read_steps(outdir)
    if not steps:
        return [Row("gpu_check", "FAIL", f"no steps recorded in {os.path.join(outdir, 'steps.tsv')}")]
    for step in steps:
        builder = ROW_BUILDERS.get(step.kind.partition(":")[0], rows_generic)
        try:
            rows.extend(builder(step, outdir, context))
        except Exception as e:  # a parser bug must cost one row, not the table
            rows.append(Row(step.name, "FAIL", f"could not read its results: {type(e).__name__}: {e}",
                            step.seconds, step.log))
    for summary in SUMMARY_BUILDERS:
        try:
            rows.extend(summary(context))
        except Exception as e:
            rows.append(Row(summary.__name__, "FAIL", f"{type(e).__name__}: {e}"))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| check | status | key numbers | s | log |", "|---|---|---|---|---|"]
    for r in rows:
        numbers = r.numbers.replace("|", "/")
        lines.append(f"| {r.check} | {r.status} | {numbers} | {'' if r.seconds is None else r.seconds} | {r.log} |")
    return "\n".join(lines)


def cmd_table(args) -> int:
    rows = build_rows(args.outdir)
    table = markdown(rows)
    failed = [r.check for r in rows if r.status == "FAIL"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all checks passed"
    header = ""
    env_path = os.path.join(args.outdir, "env.txt")
    if os.path.exists(env_path):
        with open(env_path) as f:
            header = "```\n" + f.read().strip() + "\n```\n\n"
    total = sum(s.seconds for s in read_steps(args.outdir))
    with open(os.path.join(args.outdir, "summary.md"), "w") as f:
        f.write(f"# gpu_check\n\n{header}{table}\n\n{verdict} ({total} s of steps)\n")
    with open(os.path.join(args.outdir, "summary.json"), "w") as f:
        json.dump({"rows": [asdict(r) for r in rows], "failed": failed}, f, indent=1, default=str)
    print(table)
    print(f"\n{verdict} ({total} s of steps); logs and summary.md in {args.outdir}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment header; exit 2 without a CUDA GPU")
    table = sub.add_parser("table", help="print the final table from OUTDIR/steps.tsv and the logs")
    table.add_argument("outdir")
    args = p.parse_args(argv)
    return {"env": cmd_env, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
