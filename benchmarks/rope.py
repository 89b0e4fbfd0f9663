#!/usr/bin/env python
"""HARPE RoPE against standard RoPE, measured side by side in one run: saved bytes, time, model step.

    python benchmarks/rope.py                 # CPU: s in {4096, 32768}; GPU (if present): s in {32768, 131072}
    python benchmarks/rope.py --seq 4096 --repeats 3

For each sequence length and dtype (h=32 heads, d=128, batch 1, one layer's q and k):
  * with ``--check-kernels``: HARPE's Triton kernel against HARPE's torch kernel, forward and backward (the
    largest difference relative to the largest input, against the tolerance of tests/kernels/test_triton_rope.py);
  * bytes saved for backward (megatron_harpe.kernels.saved_bytes: each storage once):
      HARPE kernel / megatron standard RoPE, and megatron unfused per-head / standard;
  * forward+backward time: HARPE kernel / megatron's unfused standard RoPE, / Liger-Kernel's Triton RoPE
    (standard, one base; CUDA, where liger-kernel is installed) and / TE's fused RoPE (standard; CUDA, where
    Transformer Engine is importable), plus the bytes per second the kernel moves. A baseline that cannot run
    is named in the JSON's ``missing`` with the reason. Liger's output is checked against megatron's standard
    RoPE once, outside the timing, so the comparison is of the same operation;
and a tiny Llama training step (forward, backward, AdamW): HarpeGPTModel / GPTModel with standard RoPE.
Timings alternate the contenders and take medians, so machine noise hits both; layout conversions (Liger's
``[b, h, s, d]`` view) happen outside the timed region. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from megatron_harpe.kernels import harpe_rope_qk, resolve_kernel
from megatron_harpe.kernels.saved_bytes import saved_bytes
from megatron_harpe.rotary import inverse_frequencies, materialize_frequencies

HEADS, DIM = 32, 128
# Peak memory bandwidth by device name (for the achieved-bandwidth fraction on GPUs).
BANDWIDTH_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def megatron_rope(config):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    class _NoCP:
        def size(self):
            return 1

        def rank(self):
            return 0

    return lambda t, freqs: apply_rotary_pos_emb(t, freqs, config=config, cp_group=_NoCP())


STANDARD_BASE = 5e6
BASES = [1e6 + 30000 * 4 * h for h in range(HEADS)]  # on the paper's 30k grid, 1e6 .. 4.72e6


def triton_runs(device) -> bool:
    """Triton kernels run on CUDA, and on a CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def te_fused_rope(device):
    """(TE's fused RoPE, None) or (None, why not)."""
    if device.type != "cuda":
        return None, "needs CUDA"
    try:
        from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb
    except ImportError:
        fused_apply_rotary_pos_emb = None
    if fused_apply_rotary_pos_emb is None:
        return None, "TE not installed"
    return fused_apply_rotary_pos_emb, None


def liger_rope(device):
    """(Liger-Kernel's ``LigerRopeFunction``, None) or (None, why not)."""
    if not triton_runs(device):
        return None, "needs CUDA (a Triton kernel)"
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError as e:
        return None, f"Liger-Kernel not installed ({e}; benchmarks/gpu_wheels.sh)"
    return LigerRopeFunction, None


def to_liger(t):
    """Megatron's ``[s, b, h, d]`` as the ``[b, h, s, d]`` Liger's autograd function takes (and the way back).

    Liger reads the physical ``[b, s, h, d]`` layout of its argument (it transposes dims 1 and 2 and calls
    ``contiguous``): with b = 1 this view of megatron's tensor already is that layout, so no copy is made."""
    return t.permute(1, 2, 0, 3)


def from_liger(t):
    return t.permute(2, 0, 1, 3)


def liger_cos_sin(positions, dtype, device):
    """Liger's (Hugging Face Llama's) ``(1, s, d)`` cos and sin of the standard base: ``cat(freqs, freqs)``,
    angles in float32, cast to the activation dtype."""
    freqs = positions[:, None] * inverse_frequencies([STANDARD_BASE], DIM).to(device)[0][None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]


def contenders(seq, dtype, device):
    """(name -> (fn(q, k) -> (q_out, k_out), to_layout, from_layout), missing baselines -> reason).

    ``to_layout`` turns megatron's ``[s, b, h, d]`` q, k (and the output gradients) into what ``fn`` takes, outside
    the timed region; ``from_layout`` turns ``fn``'s outputs back (a view, for comparisons). All use the same
    positions; every contender but "harpe" and "unfused_per_head" is standard RoPE with base 5e6."""
    from megatron_harpe.shape import LlamaShape

    shape = LlamaShape(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, ffn_hidden_size=64)
    config = shape.transformer_config(cpu=device.type == "cpu")
    config.apply_rope_fusion = False
    apply = megatron_rope(config)
    positions = torch.arange(seq, dtype=torch.float32, device=device)
    table = inverse_frequencies(BASES, DIM).to(device)
    _, standard = materialize_frequencies(positions, inverse_frequencies([STANDARD_BASE], DIM).to(device), 1, False)
    _, per_head = materialize_frequencies(positions, table, 1, False)
    same = lambda t: t  # noqa: E731
    out = {
        "harpe": (lambda q, k: harpe_rope_qk(q, k, positions, table), same, same),
        "standard": (lambda q, k: (apply(q, standard), apply(k, standard)), same, same),
        "unfused_per_head": (lambda q, k: (apply(q, per_head), apply(k, per_head)), same, same),
    }
    missing = {}
    fused, missing["te_fused_standard"] = te_fused_rope(device)
    if fused is not None:
        out["te_fused_standard"] = (lambda q, k: (fused(q, standard), fused(k, standard)), same, same)
    liger, missing["liger_standard"] = liger_rope(device)
    if liger is not None:
        cos, sin = liger_cos_sin(positions, dtype, device)
        out["liger_standard"] = (lambda q, k: liger.apply(q, k, cos, sin), to_liger, from_liger)
    return out, {name: why for name, why in missing.items() if why is not None}


def max_relative_errors(pairs):
    """{name: max |a - b| / max |reference input|} for (name, a, b, scale) tuples."""
    return {name: ((a.float() - b.float()).abs().max() / scale).item() for name, a, b, scale in pairs}


# tests/kernels/test_triton_rope.py's tolerances, relative to the largest input: Triton rounds once, the torch path
# rounds cos, sin, both products and the sum (8 half-ulps of bf16 in all).
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8 * 2.0 ** -9}


def check_kernels(seq, dtype, device):
    """HARPE's Triton kernel against HARPE's torch kernel at this shape, forward and backward."""
    positions = torch.arange(seq, dtype=torch.float32, device=device)
    table = inverse_frequencies(BASES, DIM).to(device)
    q, k = qk(seq, dtype, device)
    grads = (torch.randn_like(q), torch.randn_like(k))
    results = {}
    for impl in ("triton", "torch"):
        oq, ok = harpe_rope_qk(q, k, positions, table, impl=impl)
        dq, dk = torch.autograd.grad((oq, ok), (q, k), grads)
        results[impl] = (oq, ok, dq, dk)
        del oq, ok, dq, dk
    scales = [t.detach().abs().max().item() for t in (q, k, *grads)]
    errors = max_relative_errors(
        (name, a, b, scale) for name, a, b, scale in
        zip(("fwd q", "fwd k", "bwd q", "bwd k"), results["triton"], results["torch"], scales))
    tolerance = CHECK_TOLERANCE[dtype]
    return {"errors": errors, "tolerance": tolerance, "ok": all(e <= tolerance for e in errors.values()),
            "positions": [0, seq - 1], "bases": [BASES[0], BASES[-1]]}


def check_liger(fns, seq, dtype, device):
    """Liger's standard RoPE against megatron's unfused standard RoPE (same base), forward and backward, on copies:
    proves the layout conversion and the cos/sin handed to Liger. Liger rotates its inputs in place."""
    fn, to_layout, from_layout = fns["liger_standard"]
    reference, _, _ = fns["standard"]
    q, k = qk(seq, dtype, device)
    grads = (torch.randn_like(q), torch.randn_like(k))
    rq, rk = reference(q, k)
    rdq, rdk = torch.autograd.grad((rq, rk), (q, k), grads)
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    lq, lk = fn(to_layout(q2), to_layout(k2))
    ldq, ldk = torch.autograd.grad((lq, lk), (q2, k2), tuple(to_layout(g.clone()) for g in grads))
    scales = [t.detach().abs().max().item() for t in (q, k, *grads)]
    errors = max_relative_errors(zip(("fwd q", "fwd k", "bwd q", "bwd k"),
                                     (from_layout(lq), from_layout(lk), ldq, ldk), (rq, rk, rdq, rdk), scales))
    tolerance = CHECK_TOLERANCE[dtype]
    return {"errors": errors, "tolerance": tolerance, "ok": all(e <= tolerance for e in errors.values())}


def qk(seq, dtype, device):
    q = torch.randn(seq, 1, HEADS, DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(seq, 1, HEADS, DIM, device=device, dtype=dtype, requires_grad=True)
    return q, k


def contender_saved_bytes(contender, seq, dtype, device):
    fn, to_layout, _ = contender
    q, k = qk(seq, dtype, device)
    return saved_bytes(fn, to_layout(q), to_layout(k))


def fwd_bwd_time(fns, seq, dtype, device, repeats):
    q, k = qk(seq, dtype, device)
    grads = [torch.randn_like(q), torch.randn_like(k)]
    # Each contender's own layout, made before timing (views for all of them here).
    laid_out = {name: ((to(q), to(k)), [to(g) for g in grads]) for name, (_, to, _) in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up (and compiles Triton)
        for name, (fn, _, _) in fns.items():
            inputs, out_grads = laid_out[name]
            sync(device)
            start = time.perf_counter()
            outs = fn(*inputs)
            torch.autograd.backward(outs, out_grads)
            sync(device)
            times[name].append(time.perf_counter() - start)
            q.grad = k.grad = None
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def model_step_ratio(device, repeats):
    """Tiny Llama: HarpeGPTModel (default kernel) / megatron GPTModel (standard RoPE), one AdamW step each."""
    from megatron.core.models.gpt import GPTModel

    from megatron_harpe import HarpeGPTModel, harpe_layer_spec
    from megatron_harpe.shape import LlamaShape
    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.distributed import free_port, init_model_parallel, init_process_group
    from megatron_harpe.model import standard_layer_spec

    if not torch.distributed.is_initialized():
        init_process_group(0, 1, free_port())
        init_model_parallel()
    seq, vocab = 1024, 1024
    shape = LlamaShape(num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1376)
    config = shape.transformer_config(cpu=device.type == "cpu")
    from megatron_harpe.model import resolve_impl

    impl = resolve_impl("auto")  # TE where it is importable on CUDA, else local: both models on the same spec
    spec, standard_spec = harpe_layer_spec(impl), standard_layer_spec(impl)
    torch.manual_seed(0)
    models = {
        "harpe": HarpeGPTModel(config, spec, vocab_size=vocab, max_sequence_length=seq,
                               harpe_bases=[1e6 + 500000 * h for h in range(8)]).to(device),
        "standard": GPTModel(config, standard_spec, vocab_size=vocab, max_sequence_length=seq,
                             position_embedding_type="rope", rotary_base=5e6).to(device),
    }
    ids = torch.randint(0, vocab, (1, seq), device=device)
    if device.type == "cpu":
        # megatron's RotaryEmbedding moves its table to "cuda" on first use; warm its cache once under the
        # shim with the exact arguments GPTModel uses, so the timed steps run without the shim.
        with megatron_on_cpu():
            models["standard"].rotary_pos_emb(seq, packed_seq=False, cp_group=None)
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-5) for n, m in models.items()}
    times = {n: [] for n in models}
    for _ in range(repeats + 1):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            model(ids, None, None, labels=ids).mean().backward()
            optims[name].step()
            optims[name].zero_grad()
            sync(device)
            times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(t[1:]) for n, t in times.items()}
    return med["harpe"] / med["standard"], med


def write_json(path, device, kernel, rows, model, missing=None, model_impl=None):
    """``--json``: the table's rows, the baselines that could not run (``missing``: name -> reason) and the model
    step (``null`` until measured or with ``--skip-model``)."""
    if not path:
        return
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "kernel": kernel,
              "heads": HEADS, "head_dim": DIM, "rows": rows, "missing": missing or {},
              "model_step": None if model is None else {"ratio": model[0], "seconds": model[1], "impl": model_impl}}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default: 4096 32768 on CPU, 32768 131072 on GPU)")
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-repeats", type=int, default=10, help="timed training steps per model")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--check-kernels", action="store_true",
                   help="first compare HARPE's Triton kernel with its torch kernel at each length and dtype, forward "
                        "and backward (CUDA, or a CPU under TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE (rewritten after each row "
                                                  "and after the model step)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.check_kernels and not triton_runs(device):
        p.error("--check-kernels runs the Triton kernel: use a CUDA device, or set TRITON_INTERPRET=1 on a CPU")
    if any(s < 1 for s in args.seq or []) or args.repeats < 1 or args.model_repeats < 1:
        p.error("--seq, --repeats and --model-repeats must be positive")
    seqs = args.seq or ([32768, 131072] if device.type == "cuda" else [4096, 32768])
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    kernel = resolve_kernel("auto", device)
    peak = next((v for k, v in BANDWIDTH_GBPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), HARPE kernel: {kernel}, "
          f"h={HEADS}, d={DIM}, batch 1, one layer's q and k", flush=True)

    rows, missing = [], {}
    for seq in seqs:
        for dname in args.dtypes:
            dtype = dtypes[dname]
            row = {"seq": seq, "dtype": dname}
            if args.check_kernels:
                row["check triton/torch"] = check_kernels(seq, dtype, device)
            fns, missing = contenders(seq, dtype, device)
            if "liger_standard" in fns:
                row["check liger/std"] = check_liger(fns, seq, dtype, device)
            saved = {name: contender_saved_bytes(fn, seq, dtype, device) for name, fn in fns.items()}
            timed = fwd_bwd_time(fns, seq, dtype, device, args.repeats)
            # Bytes the kernel must move: read q, k and write them (fwd), read grads and write them (bwd).
            moved = 4 * 2 * seq * HEADS * DIM * torch.empty((), dtype=dtype).element_size()
            gbps = moved / timed["harpe"] / 1e9
            ratio = lambda name: timed["harpe"] / timed[name] if name in timed else None  # noqa: E731
            row.update({
                "saved harpe/std": saved["harpe"] / saved["standard"],
                "saved unfused-per-head/std": saved["unfused_per_head"] / saved["standard"],
                "time harpe/std": ratio("standard"),
                "time harpe/TE": ratio("te_fused_standard"),
                "time harpe/liger": ratio("liger_standard"),
                "GB/s": gbps,
                "of peak": gbps / peak if peak else None,
                "saved MiB (harpe, std, per-head)": tuple(round(saved[n] / 2**20, 2) for n in ("harpe", "standard", "unfused_per_head")),
                "saved MiB": {name: round(b / 2**20, 2) for name, b in saved.items()},
                "ms (harpe, std)": (timed["harpe"] * 1e3, timed["standard"] * 1e3),
                "ms": {name: t * 1e3 for name, t in timed.items()},
            })
            rows.append(row)
            write_json(args.json, device, kernel, rows, None, missing)
            print(f"  s={seq} {dname}: done", flush=True)
            del fns
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model, model_impl = None, None
    if not args.skip_model:
        from megatron_harpe.model import resolve_impl

        model_impl = resolve_impl("auto")
        model = model_step_ratio(device, args.model_repeats)
    write_json(args.json, device, kernel, rows, model, missing, model_impl)

    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    if any("check triton/torch" in r for r in rows):
        print("\n| s | dtype | Triton vs torch kernel: max error / max input (fwd q, fwd k, bwd q, bwd k) | tolerance | ok |")
        print("|---|---|---|---|---|")
        for r in rows:
            c = r["check triton/torch"]
            print(f"| {r['seq']} | {r['dtype']} | {', '.join(f'{e:.2e}' for e in c['errors'].values())} | "
                  f"{c['tolerance']:.2e} | {c['ok']} |")
    print("\n| s | dtype | saved: HARPE / standard | saved: unfused per-head / standard | fwd+bwd: HARPE / standard "
          "| HARPE / Liger | HARPE / TE fused | HARPE GB/s | of peak bandwidth | saved MiB (HARPE, std, per-head) "
          "| ms (HARPE, std) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['dtype']} | {r['saved harpe/std']:.3f} | {r['saved unfused-per-head/std']:.1f} | "
              f"{r['time harpe/std']:.2f} | {fmt(r['time harpe/liger'], '.2f')} | {fmt(r['time harpe/TE'], '.2f')} | "
              f"{r['GB/s']:.1f} | {fmt(r['of peak'], '.0%')} | "
              f"{r['saved MiB (harpe, std, per-head)']} | {r['ms (harpe, std)'][0]:.1f}, {r['ms (harpe, std)'][1]:.1f} |")
    for name, why in missing.items():
        print(f"{name}: not measured ({why})")
    if model is not None:
        ratio, med = model
        print(f"\nmodel step (4-layer Llama, hidden 512, 8 heads, seq 1024, AdamW, {model_impl} spec): "
              f"HarpeGPTModel / GPTModel = {ratio:.3f} ({med['harpe'] * 1e3:.0f} ms vs {med['standard'] * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
