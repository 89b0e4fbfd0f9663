#!/usr/bin/env python
"""HARPE RoPE against standard RoPE, measured side by side in one run: saved bytes, time, model step.

    python benchmarks/rope.py                 # CPU: s in {4096, 32768}; GPU (if present): s in {32768, 131072}
    python benchmarks/rope.py --seq 4096 --repeats 3

For each sequence length and dtype (h=32 heads, d=128, batch 1, one layer's q and k):
  * bytes saved for backward (torch.autograd.graph.saved_tensors_hooks):
      HARPE kernel / megatron standard RoPE, and megatron unfused per-head / standard;
  * forward+backward time: HARPE kernel / megatron's unfused standard RoPE (and / TE fused RoPE on a GPU
    with Transformer Engine), plus the bytes per second the kernel moves;
and a tiny Llama training step (forward, backward, AdamW): HarpeGPTModel / GPTModel with standard RoPE.
Timings alternate the contenders and take medians, so machine noise hits both. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from megatron_harpe.kernels import harpe_rope_qk, resolve_kernel
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


def contenders(seq, dtype, device):
    """name -> fn(q, k) -> (q_out, k_out), all with the same positions."""
    from megatron_harpe.configs import llama_config

    config = llama_config(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, ffn_hidden_size=64,
                          cpu=device.type == "cpu")
    config.apply_rope_fusion = False
    apply = megatron_rope(config)
    positions = torch.arange(seq, dtype=torch.float32, device=device)
    bases = [1e6 + 30000 * 4 * h for h in range(HEADS)]
    table = inverse_frequencies(bases, DIM).to(device)
    _, standard = materialize_frequencies(positions, inverse_frequencies([5e6], DIM).to(device), 1, False)
    _, per_head = materialize_frequencies(positions, table, 1, False)
    out = {
        "harpe": lambda q, k: harpe_rope_qk(q, k, positions, table),
        "standard": lambda q, k: (apply(q, standard), apply(k, standard)),
        "unfused_per_head": lambda q, k: (apply(q, per_head), apply(k, per_head)),
    }
    try:
        from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb

        if device.type == "cuda" and fused_apply_rotary_pos_emb is not None:
            out["te_fused_standard"] = lambda q, k: (fused_apply_rotary_pos_emb(q, standard),
                                                     fused_apply_rotary_pos_emb(k, standard))
    except ImportError:
        pass
    return out


def qk(seq, dtype, device):
    q = torch.randn(seq, 1, HEADS, DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(seq, 1, HEADS, DIM, device=device, dtype=dtype, requires_grad=True)
    return q, k


def saved_bytes(fn, seq, dtype, device):
    q, k = qk(seq, dtype, device)
    sizes = {}  # by storage: what the autograd graph keeps alive, each buffer once

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn(q, k)
    del outs
    return sum(sizes.values())


def fwd_bwd_time(fns, seq, dtype, device, repeats):
    q, k = qk(seq, dtype, device)
    grads = [torch.randn_like(q), torch.randn_like(k)]
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up (and compiles Triton)
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            outs = fn(q, k)
            torch.autograd.backward(outs, grads)
            sync(device)
            times[name].append(time.perf_counter() - start)
            q.grad = k.grad = None
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def model_step_ratio(device, repeats):
    """Tiny Llama: HarpeGPTModel (default kernel) / megatron GPTModel (standard RoPE), one AdamW step each."""
    from megatron.core.models.gpt import GPTModel

    from megatron_harpe import HarpeGPTModel, harpe_layer_spec
    from megatron_harpe.configs import llama_config
    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.distributed import free_port, init_model_parallel, init_process_group
    from megatron_harpe.model import standard_layer_spec

    if not torch.distributed.is_initialized():
        init_process_group(0, 1, free_port())
        init_model_parallel()
    seq, vocab = 1024, 1024
    config = llama_config(num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1376,
                          cpu=device.type == "cpu")
    impl = "te" if device.type == "cuda" else "local"  # both models on the same layer implementation
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


def write_json(path, device, kernel, rows, model):
    """``--json``: the table's rows and the model step (``null`` until measured or with ``--skip-model``)."""
    if not path:
        return
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "kernel": kernel,
              "heads": HEADS, "head_dim": DIM, "rows": rows,
              "model_step": None if model is None else {"ratio": model[0], "seconds": model[1]}}
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
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE (rewritten after each row "
                                                  "and after the model step)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    seqs = args.seq or ([32768, 131072] if device.type == "cuda" else [4096, 32768])
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    kernel = resolve_kernel("auto", device)
    peak = next((v for k, v in BANDWIDTH_GBPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), HARPE kernel: {kernel}, "
          f"h={HEADS}, d={DIM}, batch 1, one layer's q and k", flush=True)

    rows = []
    for seq in seqs:
        for dname in args.dtypes:
            dtype = dtypes[dname]
            fns = contenders(seq, dtype, device)
            saved = {name: saved_bytes(fn, seq, dtype, device) for name, fn in fns.items()}
            timed = fwd_bwd_time(fns, seq, dtype, device, args.repeats)
            # Bytes the kernel must move: read q, k and write them (fwd), read grads and write them (bwd).
            moved = 4 * 2 * seq * HEADS * DIM * torch.empty((), dtype=dtype).element_size()
            gbps = moved / timed["harpe"] / 1e9
            row = {
                "seq": seq, "dtype": dname,
                "saved harpe/std": saved["harpe"] / saved["standard"],
                "saved unfused-per-head/std": saved["unfused_per_head"] / saved["standard"],
                "time harpe/std": timed["harpe"] / timed["standard"],
                "time harpe/TE": timed["harpe"] / timed["te_fused_standard"] if "te_fused_standard" in timed else None,
                "GB/s": gbps,
                "of peak": gbps / peak if peak else None,
                "saved MiB (harpe, std, per-head)": tuple(round(saved[n] / 2**20, 2) for n in ("harpe", "standard", "unfused_per_head")),
                "ms (harpe, std)": (timed["harpe"] * 1e3, timed["standard"] * 1e3),
                "ms": {name: t * 1e3 for name, t in timed.items()},
            }
            rows.append(row)
            write_json(args.json, device, kernel, rows, None)
            print(f"  s={seq} {dname}: done", flush=True)
            del fns
    model = None if args.skip_model else model_step_ratio(device, args.model_repeats)
    write_json(args.json, device, kernel, rows, model)

    print("\n| s | dtype | saved: HARPE / standard | saved: unfused per-head / standard | fwd+bwd: HARPE / standard "
          "| HARPE / TE fused | HARPE GB/s | of peak bandwidth | saved MiB (HARPE, std, per-head) | ms (HARPE, std) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    for r in rows:
        print(f"| {r['seq']} | {r['dtype']} | {r['saved harpe/std']:.3f} | {r['saved unfused-per-head/std']:.1f} | "
              f"{r['time harpe/std']:.2f} | {fmt(r['time harpe/TE'], '.2f')} | {r['GB/s']:.1f} | {fmt(r['of peak'], '.0%')} | "
              f"{r['saved MiB (harpe, std, per-head)']} | {r['ms (harpe, std)'][0]:.1f}, {r['ms (harpe, std)'][1]:.1f} |")
    if model is not None:
        ratio, med = model
        print(f"\nmodel step (4-layer Llama, hidden 512, 8 heads, seq 1024, AdamW): HarpeGPTModel / GPTModel = "
              f"{ratio:.3f} ({med['harpe'] * 1e3:.0f} ms vs {med['standard'] * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
