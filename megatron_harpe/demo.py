"""The HARPE demonstration: choose HARPE bases, draw them, run a tiny HARPE model at TP=2 against TP=1.

No downloads, CPU only. Step 1 of examples/quickstart_cpu.sh, which goes on with synthetic data -> pretraining ->
checkpoint -> HF export -> Needle-in-a-Haystack. The command is ``megatron_harpe.cli:demo`` (harpe-demo).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, select_bases, waveform_ripple
from megatron_harpe.outputs import atomic_output_dir
from megatron_harpe.warning_filters import filter_unactionable_warnings

LLAMA2_7B = dict(head_dim=128, target_length=131072)


def _step(n, total, text):
    print(f"[{n}/{total}] {text}", flush=True)


def compare_with_paper(bases) -> dict:
    paper = np.array(PAPER_LLAMA2_7B_BASES, dtype=np.float64)
    ours = np.array(sorted(bases), dtype=np.float64)
    return {
        "same_values": int(len(set(ours.tolist()) & set(paper.tolist()))),
        "mean_abs_diff_sorted": float(np.abs(ours - paper).mean()),
        "max_abs_diff_sorted": float(np.abs(ours - paper).max()),
    }


def _tp_worker(rank, world_size, out_dir):
    filter_unactionable_warnings()  # a spawned process starts with the default filters
    import torch

    from megatron.core import parallel_state

    from megatron_harpe import HarpeGPTModel, harpe_layer_spec
    from megatron_harpe.shape import SHAPES
    from megatron_harpe.distributed import init_model_parallel
    from megatron_harpe.sharding import local_view, load_full_state_dict

    bases = [1e4, 1e6]
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))

    def run(tp):
        init_model_parallel(tp=tp)
        torch.manual_seed(1234)
        model = HarpeGPTModel(SHAPES["tiny"].transformer_config(tp=tp), harpe_layer_spec("local"), vocab_size=128,
                              max_sequence_length=1024, harpe_bases=bases)
        return model

    reference = run(1)
    full = {n: p.detach().clone() for n, p in reference.named_parameters()}
    ref_logits = reference(ids, None, None)
    ref_logits.square().mean().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    model = run(2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    load_full_state_dict(model, full, tp_rank, 2, gated_linear_unit=True)
    logits = model(ids, None, None)  # this rank's half of the vocabulary
    vocab = logits.size(-1)
    local_ref = ref_logits[..., tp_rank * vocab : (tp_rank + 1) * vocab]
    # Same loss as the reference: mean over the full vocabulary, summed across TP ranks.
    loss = logits.square().sum() / ref_logits.numel()
    loss.backward()
    expected = local_view(model, ref_grads, tp_rank, 2, gated_linear_unit=True)
    result = {
        "rank": rank,
        "max_abs_logit_diff": float((logits - local_ref).detach().abs().max()),
        "max_abs_grad_diff": max(float((p.grad - expected[n]).abs().max()) for n, p in model.named_parameters()),
    }
    with open(os.path.join(out_dir, f"tp2_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=2)


def run_demo(out: str, force: bool = False) -> None:
    """The three steps into ``out`` (a new directory, or one this package wrote with ``force``)."""
    filter_unactionable_warnings()
    with atomic_output_dir(out, force=force) as tmp:
        total = 3
        started = time.perf_counter()
        _step(1, total, "choosing 32 bases for Llama-2-7B at 131072 tokens (peak-valley, 1M..5M, stride 30k)")
        peak_valley = select_bases(32, "peak_valley", 1e6, 5e6, stride=30000, **LLAMA2_7B)
        uniform = select_bases(32, "uniform", 1e6, 5e6, **LLAMA2_7B)
        ripple = {name: waveform_ripple(b, **LLAMA2_7B) for name, b in
                  [("peak_valley", peak_valley), ("uniform", uniform), ("paper_table2", PAPER_LLAMA2_7B_BASES)]}
        summary = {"peak_valley": peak_valley, "uniform": uniform, "paper_table2": list(PAPER_LLAMA2_7B_BASES),
                   "ripple (lower = peaks and valleys interleave better)": ripple,
                   "peak_valley vs paper": compare_with_paper(peak_valley)}
        with open(os.path.join(tmp, "bases.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("      peak-valley (millions):", " ".join(f"{b / 1e6:.2f}" for b in peak_valley))
        print("      waveform ripple: " + ", ".join(f"{k} {v:.1f}" for k, v in ripple.items()))

        _step(2, total, "drawing attention waveforms")
        from megatron_harpe.plots import plot_bases

        plot_bases(peak_valley, os.path.join(tmp, "waveforms_peak_valley.png"), single_base=5e6,
                   compare=PAPER_LLAMA2_7B_BASES, title="HARPE peak-valley", **LLAMA2_7B)
        plot_bases(PAPER_LLAMA2_7B_BASES, os.path.join(tmp, "waveforms_paper_table2.png"), single_base=5e6,
                   title="HARPE paper Table 2", **LLAMA2_7B)

        _step(3, total, "tiny HarpeGPTModel forward/backward on the CPU, TP=2 against TP=1 (2 gloo processes)")
        from megatron_harpe.distributed import spawn

        spawn(_tp_worker, 2, tmp)
        checks = [json.load(open(os.path.join(tmp, f"tp2_rank{r}.json"))) for r in range(2)]
        worst_logit = max(c["max_abs_logit_diff"] for c in checks)
        worst_grad = max(c["max_abs_grad_diff"] for c in checks)
        print(f"      max |logit diff| {worst_logit:.2e}, max |grad diff| {worst_grad:.2e}")
        if worst_logit > 1e-4 or worst_grad > 1e-4:
            raise RuntimeError("TP=2 does not match TP=1: this is a bug, please report it with this output")
        print(f"done in {time.perf_counter() - started:.0f}s")
