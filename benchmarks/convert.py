#!/usr/bin/env python
"""Checkpoint conversion against model size: peak memory per added layer, throughput against a page-cache copy.

    python benchmarks/convert.py                          # Llama-2-7B layer shapes with 1, 4 and 16 layers, bf16
    python benchmarks/convert.py --layers 1,2             # quick
    python benchmarks/convert.py --write-results          # also write benchmarks/results/convert_7b.md

A synthetic Hugging Face Llama with 7B shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) and ``--layers``
layers is written as safetensors, one shard per layer. Then, each as its own process through the tools' command
line: HF -> Megatron ``torch`` (TP ``--tp``), ``torch`` -> HF, HF -> ``torch_dist``, ``torch_dist`` -> HF (the
exports with ``--max-shard-gb``, so that the output shard being filled stays small beside a layer; at the largest
layer count once more with the tool's default 5 GB). Every output is deleted as soon as it has been measured.

Each job reports wall seconds and two peaks of its process tree: anonymous resident memory (``RssAnon``: what the
processes allocated), sampled every 50 ms, and proportional set size (PSS, which also counts the page-cache pages
of memory-mapped checkpoint files the kernel can reclaim), sampled as often as keeps its page-table walk under a
tenth of a core (every ~0.4 s for a 6 GB process). The slope of peak against layers (least squares) is what
extrapolates to Llama-2-70B. Throughput is a ratio: the job's bytes per second over those of a page-cache
``shutil.copytree`` of the Hugging Face directory, timed just before and just after the job, also with the start-up
of a bare ``python -c "import torch, megatron.core, megatron.training"``, measured beside the jobs, subtracted.
Every measured run starts after ``os.sync()`` and a few idle seconds (:func:`settle`), and CPU seconds and page
faults are recorded beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from measure import REPO, run_measured

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000)
LLAMA2_70B_LAYERS = 80
BF16 = 2
TOOL_SHARD_GB = 5.0  # tools/convert_megatron_to_hf.py's --max-shard-gb default
STARTUP = [sys.executable, "-c", "import torch, megatron.core, megatron.training"]
SETTLE_S = 5.0  # idle before each measured run (settle)
RESULTS = os.path.join(REPO, "benchmarks", "results", "convert_7b.md")
MIB, GB = 2**20, 1e9


def layer_bytes(shape: dict) -> int:
    """bf16 bytes of one decoder layer: q, k, v, o, gate, up, down and the two norms."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return BF16 * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)


def model_bytes(shape: dict, layers: int) -> int:
    """bf16 bytes of the whole model: the layers, the embedding, the output layer and the final norm."""
    h = shape["hidden_size"]
    return layers * layer_bytes(shape) + BF16 * (2 * shape["vocab_size"] * h + h)


def write_synthetic_hf(path: str, layers: int, seed: int = 0) -> int:
    """A Llama-2-7B-shaped checkpoint with ``layers`` layers, one safetensors shard per layer, written one shard at a
    time (this process holds one layer); returns its tensor bytes."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="bfloat16",
                  tie_word_embeddings=False, hidden_act="silu", **SEVEN_B)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    h, f_, v = SEVEN_B["hidden_size"], SEVEN_B["intermediate_size"], SEVEN_B["vocab_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def shard(i):
        if i == 0:
            return {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h) + 1,
                    "lm_head.weight": rand(v, h)}
        p = f"model.layers.{i - 1}."
        return {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
                p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f_, h), p + "mlp.up_proj.weight": rand(f_, h),
                p + "mlp.down_proj.weight": rand(h, f_), p + "input_layernorm.weight": rand(h) + 1,
                p + "post_attention_layernorm.weight": rand(h) + 1}

    weight_map, total = {}, 0
    for i in range(layers + 1):
        tensors = shard(i)
        name = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def settle() -> None:
    """What every measured run starts from: no dirty pages (os.sync), then SETTLE_S idle (the previous run's
    writeback and freed memory done with: on this virtual machine the host takes back idle free memory)."""
    os.sync()
    time.sleep(SETTLE_S)


def copy_seconds(src: str, scratch: str) -> float:
    """Seconds of a page-cache copy of ``src`` (its pages are cached: it was just written or read)."""
    settle()
    start = time.perf_counter()
    shutil.copytree(src, scratch)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def write_seconds(scratch: str, size: int = 512 * MIB) -> dict[int, float]:
    """Seconds to write ``size`` bytes from memory into a new file, in pieces of 1 and of 16 MiB (the files kept
    until both are written): where 16 MiB pieces are much slower, the page cache's 2 MiB folios are served by the
    host (megatron_harpe/convert/file_io.py), what the converters' capped writes avoid."""
    data = memoryview(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy())
    seconds = {}
    os.makedirs(scratch)
    for piece in (MIB, 16 * MIB):
        settle()
        start = time.perf_counter()
        fd = os.open(os.path.join(scratch, str(piece)), os.O_WRONLY | os.O_CREAT)
        for offset in range(0, size, piece):
            os.write(fd, data[offset:offset + piece])
        os.close(fd)
        seconds[piece] = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


@dataclass
class Job:
    name: str
    command: list
    delete: list  # what to remove once it has been measured (a checkpoint goes with its last export)


def jobs_for(root: str, hf: str, tp: int, shard_gb: float, with_default_shard: bool) -> list[Job]:
    """The four directions, each export right after the import it reads (so one Megatron checkpoint is on disk)."""
    py, back = sys.executable, os.path.join(root, "back")
    jobs = []
    for fmt, label, layout, trust in [("torch", f"torch TP{tp}", ["--tp", tp], []),
                                      ("torch_dist", "torch_dist", [], ["--allow-pickle"])]:
        meg = os.path.join(root, fmt)
        jobs.append(Job(f"HF -> {label}", [py, "tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", meg,
                                           "--format", fmt, *layout], []))
        to_hf = [py, "tools/convert_megatron_to_hf.py", "--megatron-dir", meg, "--out", back, *trust]
        jobs.append(Job(f"{label} -> HF", [*to_hf, "--max-shard-gb", shard_gb], [back]))
        if with_default_shard:
            jobs.append(Job(f"{label} -> HF ({TOOL_SHARD_GB:g} GB shards)", to_hf, [back]))
        jobs[-1].delete.append(meg)
    return jobs


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) if n > 1 else 0.0
    return my - slope * mx, slope


def commit() -> str:
    """The checked-out commit (read only), marked when the tree has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()
    head = git("log", "-1", "--oneline") or "unknown"
    return head + (" (+ uncommitted changes)" if git("diff", "--name-only", "HEAD") else "")


def fit_lines(rows: list[dict]) -> dict:
    """Per job measured at two or more layer counts: {peak key: (intercept, slope)} of its least-squares line."""
    fits = {}
    for job in dict.fromkeys(r["job"] for r in rows):
        mine = {r["layers"]: r for r in rows if r["job"] == job and "error" not in r}
        if len(mine) > 1:
            xs = sorted(mine)
            fits[job] = {k: least_squares(xs, [mine[x][k] for x in xs]) for k in ("peak_pss_mib", "peak_anon_mib")}
    return fits


def big_copy_rate(rows: list[dict], layers: int) -> float:
    """GB/s of the copies beside the jobs at ``layers`` (their mean time)."""
    mine = [r for r in rows if r["layers"] == layers and "copy_s" in r]
    return mine[0]["gb"] / (sum(r["copy_s"] for r in mine) / len(mine))


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(rows: list[dict], writes: dict[int, float], startups: list[dict], shard_gb: float) -> str:
    """The markdown: conditions, the per-job table, the per-layer slopes and the 70B extrapolation."""
    layer7, layer70 = layer_bytes(SEVEN_B), layer_bytes(LLAMA2_70B)
    scale = layer70 / layer7
    start_pss = max(s["peak_pss_mib"] for s in startups)
    start_anon = max(s["peak_anon_mib"] for s in startups)
    load = os.getloadavg()
    out = [f"Llama-2-7B layer shapes, bf16, synthetic weights; commit {commit()}; {os.cpu_count()} CPUs, "
           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; exports with "
           f"--max-shard-gb {shard_gb:g} unless marked. Load average at the end {load[0]:.1f} / {load[1]:.1f} "
           "(1 / 5 min).",
           "",
           f"Every measured run (copy, start-up, job) starts after `os.sync()` and {SETTLE_S:g} s idle. 512 MiB "
           f"written from memory into a new file took {writes[MIB]:.2f} s in 1 MiB writes and "
           f"{writes[16 * MIB]:.2f} s in 16 MiB writes: where the second is much slower, this machine's host serves "
           "the page cache's 2 MiB folios (`megatron_harpe/convert/file_io.py`; the converters write at most 1 MiB "
           "a call). "
           "\"copy\": `shutil.copytree` of the HF directory (in the page cache), once before and once after each "
           "job; \"start-up\": `python -c \"" + STARTUP[2] + "\"` alone, once before and once after each job "
           f"(peak PSS {start_pss:.0f} MiB, anonymous {start_anon:.0f} MiB). A job's ratios use the mean of its "
           "two neighbours; \"net\" subtracts the start-up from the job's time. user / sys: CPU seconds of the "
           "job's processes; faults: their minor page faults (each a first touch of a 4 KiB page).",
           "",
           "| layers | GB | job | s | copy s | start-up s | user s | sys s | faults / GB (k) | peak PSS MiB | "
           "peak anon MiB | GB/s | / copy | net / copy |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['layers']} | {r['gb']:.2f} | {r['job']} |"
        if "error" in r:
            out.append(f"{head} failed: {r['error']} |||||||||||")
            continue
        net = r["wall_s"] - r["startup_s"]
        net_ratio = f"{r['copy_s'] / net:.3f}" if net > 0 else "n/a (start-up slower than the job)"
        out.append(f"{head} {r['wall_s']:.1f} | {r['copy_s']:.1f} | {r['startup_s']:.1f} | {r['user_s']:.1f} | "
                   f"{r['sys_s']:.1f} | {r['minor_faults'] / r['gb'] / 1e3:.0f} | {r['peak_pss_mib']:.0f} | "
                   f"{r['peak_anon_mib']:.0f} | {r['gb'] / r['wall_s']:.2f} | {r['copy_s'] / r['wall_s']:.3f} | "
                   f"{net_ratio} |")
    fits, counts = fit_lines(rows), sorted({r["layers"] for r in rows})
    if not fits:
        return "\n".join(out) + "\n"
    lo, hi = counts[0], counts[-1]
    pairs = list(dict.fromkeys([(lo, hi), (counts[-2], hi)]))
    percent = 100 * MIB / layer7
    out += ["", f"Peak memory per added 7B layer (a layer is {layer7 / MIB:.0f} MiB in bf16; the target, <= 5%, "
            f"is {0.05 * layer7 / MIB:.0f} MiB): least-squares slope over {', '.join(map(str, counts))} layers; "
            "the last columns: PSS, anon slopes between two counts (the largest two leave out the smallest "
            "size, at which fixed buffers such as an export's output shard are not yet full).", "",
            "| job | PSS MiB/layer | PSS % of a layer | anon MiB/layer | anon % of a layer | "
            + " | ".join(f"({b}) - ({a}) over {b - a}" for a, b in pairs) + " |",
            "|---|---|---|---|---|" + "---|" * len(pairs)]
    for job, fit in fits.items():
        mine = {r["layers"]: r for r in rows if r["job"] == job and "error" not in r}
        spans = [f"{(mine[b]['peak_pss_mib'] - mine[a]['peak_pss_mib']) / (b - a):.1f}, "
                 f"{(mine[b]['peak_anon_mib'] - mine[a]['peak_anon_mib']) / (b - a):.1f}"
                 if a in mine and b in mine else "" for a, b in pairs]
        pss, anon = fit["peak_pss_mib"][1], fit["peak_anon_mib"][1]
        out.append(f"| {job} | {pss:.1f} | {pss * percent:.1f}% | {anon:.1f} | {anon * percent:.1f}% | "
                   + " | ".join(spans) + " |")
    total70 = model_bytes(LLAMA2_70B, LLAMA2_70B_LAYERS)
    big = {r["job"]: r for r in rows if r["layers"] == hi and "error" not in r}
    copy_rate = big_copy_rate(rows, hi)
    out += ["", f"Llama-2-70B ({LLAMA2_70B_LAYERS} layers of {layer70 / GB:.2f} GB, {total70 / GB:.1f} GB in bf16; "
            f"a 70B layer is {scale:.2f}x a 7B layer): peak = start-up + (fixed - start-up) x {scale:.2f} + "
            f"slope x {scale:.2f} x {LLAMA2_70B_LAYERS}. The slope is the least-squares one above (a negative one "
            "counts as 0); the fixed part is that line's value at 0 layers, raised until the line bounds every "
            "measured peak: the imports plus the buffers of a layer or a tensor in flight, which grow with a "
            f"layer's size, not with the count; the slope scales the same way. An export with {TOOL_SHARD_GB:g} GB "
            f"shards adds its measured difference to the small-shard export at {hi} layers (what a shard's size "
            "costs does not grow with the count). "
            f"Minutes = start-up + bytes at the {hi}-layer rate net of start-up (the page-cache copy's {hi}-layer "
            f"rate would take {total70 / GB / copy_rate / 60:.1f} min, a lower bound: 70B does not fit the page "
            "cache).", "",
            f"The targets: slope <= 5% of a layer, 70B under 16 GB, and net throughput >= 0.5 of the copy at {hi} "
            "layers.", "",
            "| job | 70B peak PSS GB | 70B peak anon GB | 70B minutes | slope <= 5% (anon, PSS) | 70B anon < 16 GB | "
            f"net / copy >= 0.5 at {hi} |", "|---|---|---|---|---|---|---|"]
    for job, r in big.items():
        base = job.split(" (")[0]  # a default-shard export: extrapolate its small-shard line
        if base not in fits or base not in big:
            continue
        peaks = []
        for key, start in (("peak_pss_mib", start_pss), ("peak_anon_mib", start_anon)):
            slope = max(fits[base][key][1], 0.0)
            fixed = max(m[key] - slope * m["layers"] for m in rows if m["job"] == base and "error" not in m)
            peak = start + (fixed - start) * scale + slope * scale * LLAMA2_70B_LAYERS
            if base != job:
                peak += r[key] - big[base][key]
            peaks.append(peak * MIB / GB)
        net = max(r["wall_s"] - r["startup_s"], 1e-9)
        minutes = (r["startup_s"] + total70 / GB / r["gb"] * net) / 60
        slopes = [fits[base][k][1] <= 0.05 * layer7 / MIB for k in ("peak_anon_mib", "peak_pss_mib")]
        out.append(f"| {job} | {peaks[0]:.1f} | {peaks[1]:.1f} | {minutes:.1f} | "
                   f"{', '.join(yes(ok) for ok in slopes)} | {yes(peaks[1] < 16)} | "
                   f"{yes(r['copy_s'] / net >= 0.5)} ({r['copy_s'] / net:.2f}) |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="1,4,16", help="comma-separated layer counts (default 1,4,16)")
    p.add_argument("--tp", type=int, default=2, help="tensor parallel size of the torch-format checkpoint")
    p.add_argument("--work-dir", default="/tmp/harpe_convert_bench",
                   help="a new scratch directory (16 layers: ~21 GB at a time), removed at the end")
    p.add_argument("--max-shard-gb", type=float, default=0.5, help="the exports' output shard size (default 0.5)")
    p.add_argument("--write-results", nargs="?", const=RESULTS, metavar="PATH",
                   help=f"also write the report to PATH (default {os.path.relpath(RESULTS, REPO)})")
    args = p.parse_args()
    counts = sorted(int(x) for x in args.layers.split(","))
    if os.path.exists(args.work_dir):
        p.error(f"--work-dir {args.work_dir} exists: remove it or choose another (it is deleted at the end)")
    rows, startups = [], []
    run_measured(STARTUP)  # the first start-up reads the libraries from disk: not what the jobs see
    try:
        writes = write_seconds(os.path.join(args.work_dir, "writes"))
        print(f"512 MiB into a new file: {writes[MIB]:.2f} s in 1 MiB writes, {writes[16 * MIB]:.2f} s in 16 MiB",
              flush=True)
        for layers in counts:
            root = os.path.join(args.work_dir, f"l{layers}")
            hf, scratch = os.path.join(root, "hf"), os.path.join(root, "copy")
            size = write_synthetic_hf(hf, layers)
            copies = [copy_seconds(hf, scratch)]
            print(f"{layers} layers ({size / GB:.2f} GB): copy {copies[0]:.2f} s", flush=True)
            with_default = layers == counts[-1] and args.max_shard_gb != TOOL_SHARD_GB
            settle()
            startups.append(run_measured(STARTUP))
            for job in jobs_for(root, hf, args.tp, args.max_shard_gb, with_default):
                row = dict(layers=layers, gb=size / GB, job=job.name)
                settle()
                try:
                    row.update(run_measured(job.command))
                except RuntimeError as e:  # a broken direction is reported, the others still measured
                    row["error"] = str(e).strip().splitlines()[-1][:200]
                    print(f"  {job.name:<32} FAILED: {e}", flush=True)
                for path in job.delete:
                    shutil.rmtree(path, ignore_errors=True)
                # A start-up and a copy on each side of every job (shared with its neighbours): their means are
                # this job's, so that a job is compared with what the machine did just then.
                settle()
                startups.append(run_measured(STARTUP))
                copies.append(copy_seconds(hf, scratch))
                row["startup_s"] = (startups[-2]["wall_s"] + startups[-1]["wall_s"]) / 2
                row["copy_s"] = (copies[-2] + copies[-1]) / 2
                if "error" not in row:
                    print(f"  {job.name:<32} {row['wall_s']:6.1f} s (start-up {row['startup_s']:4.1f} s, copy "
                          f"{copies[-2]:.1f} / {copies[-1]:.1f} s)  user {row['user_s']:5.1f} s  sys "
                          f"{row['sys_s']:5.1f} s  peak PSS {row['peak_pss_mib']:6.0f} MiB  anon "
                          f"{row['peak_anon_mib']:6.0f} MiB", flush=True)
                rows.append(row)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    text = report(rows, writes, startups, args.max_shard_gb)
    print("\n" + text, end="")
    if args.write_results:
        with open(args.write_results, "w") as f:
            f.write(f"# `benchmarks/convert.py {' '.join(sys.argv[1:])}`\n\n{text}")
        print(f"wrote {args.write_results}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
