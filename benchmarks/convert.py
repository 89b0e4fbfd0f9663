#!/usr/bin/env python
"""Checkpoint conversion cost against model size: seconds, peak memory, and throughput as a ratio of a plain copy.

    python benchmarks/convert.py                      # Llama-2-7B layer shapes with 1, 2 and 4 layers, bf16
    python benchmarks/convert.py --layers 2,8 --tp 4

A synthetic Hugging Face Llama with 7B shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) and fewer layers
is written as safetensors; then, as separate processes, HF -> Megatron ``torch`` format (TP ``--tp``),
HF -> Megatron ``torch_dist``, and Megatron (torch) -> HF. Each reports wall seconds and the peak memory of its
process tree; the same bytes copied with ``shutil.copyfile`` (cold from the page cache as much as the
conversions are) give the reference throughput. Per-layer growth of peak memory is what extrapolates to 70B
(``torch`` format: one rank's shard plus one full layer; ``torch_dist``: the whole model). The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from measure import REPO, run_measured

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000)


def write_synthetic_hf(path: str, layers: int, seed: int = 0) -> int:
    """A Llama-2-7B-shaped checkpoint with ``layers`` layers, one safetensors shard per layer; returns its bytes."""
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

    shards = [{"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h) + 1, "lm_head.weight": rand(v, h)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
                       p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(f_, h), p + "mlp.up_proj.weight": rand(f_, h),
                       p + "mlp.down_proj.weight": rand(h, f_), p + "input_layernorm.weight": rand(h) + 1,
                       p + "post_attention_layernorm.weight": rand(h) + 1})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def copy_seconds(src: str, dst: str) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="1,2,4")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "harpe_convert_bench"))
    args = p.parse_args()
    py = sys.executable
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        root = os.path.join(args.work_dir, f"l{layers}")
        shutil.rmtree(root, ignore_errors=True)
        hf = os.path.join(root, "hf")
        size = write_synthetic_hf(hf, layers)
        copy_s = copy_seconds(hf, os.path.join(root, "copy"))
        jobs = {
            f"HF -> torch TP{args.tp}": [py, "tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out",
                                         os.path.join(root, "torch"), "--tp", args.tp, "--format", "torch"],
            "HF -> torch_dist": [py, "tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out",
                                 os.path.join(root, "dist"), "--format", "torch_dist"],
            f"torch TP{args.tp} -> HF": [py, "tools/convert_megatron_to_hf.py", "--megatron-dir",
                                         os.path.join(root, "torch"), "--out", os.path.join(root, "back")],
        }
        for name, command in jobs.items():
            result = run_measured(command)
            rows.append(dict(layers=layers, gb=size / 1e9, job=name, copy_s=copy_s, **result))
            print(f"{layers} layers ({size / 1e9:.2f} GB): {name:>18}  {result['wall_s']:6.1f} s  "
                  f"peak {result['peak_pss_mib']:7.0f} MiB   (copy {copy_s:.2f} s)", flush=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nLlama-2-7B layer shapes, bf16, synthetic weights; TP {args.tp}; {os.cpu_count()} CPUs")
    print("| layers | GB | job | s | peak MiB | GB/s | throughput / plain copy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["gb"] / r["wall_s"]
        print(f"| {r['layers']} | {r['gb']:.2f} | {r['job']} | {r['wall_s']:.1f} | {r['peak_pss_mib']:.0f} | "
              f"{rate:.2f} | {rate / (r['gb'] / r['copy_s']):.3f} |")
    layer_counts = sorted({r["layers"] for r in rows})
    if len(layer_counts) > 1:
        a, b = layer_counts[0], layer_counts[-1]
        for job in dict.fromkeys(r["job"] for r in rows):
            pa = next(r for r in rows if r["job"] == job and r["layers"] == a)["peak_pss_mib"]
            pb = next(r for r in rows if r["job"] == job and r["layers"] == b)["peak_pss_mib"]
            print(f"{job}: peak memory grows {(pb - pa) / (b - a):.0f} MiB per 7B layer "
                  f"(a 7B layer is {404:.0f} MiB in bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
