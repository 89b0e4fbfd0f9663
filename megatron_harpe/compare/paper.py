"""The ``paper`` preset: the same comparison at the paper's scale (Llama-2-7B, 4k -> 128k, 6B tokens per method),
as the cluster commands that run it. Printed, not run."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from megatron_harpe.compare.methods import LABELS, METHODS
from megatron_harpe.eval.cli import PAPER_LENGTHS

# Each method's launch: the script and the settings that differ from its defaults (examples/pretrain_llama2_*.sh).
LAUNCHES = {
    "none": ("pretrain_llama2_abf.sh", {"ROPE_BASE": "10000"}),
    "harpe_peak_valley": ("pretrain_llama2_harpe.sh", {}),  # Table 2's bases
    "harpe_uniform": ("pretrain_llama2_harpe.sh",
                      {"HARPE_ARGS": "--harpe-strategy uniform --harpe-base-min 1e6 --harpe-base-max 5e6"}),
    "abf": ("pretrain_llama2_abf.sh", {}),
    "abf_multistage": ("pretrain_llama2_abf_multistage.sh", {}),
    "pi": ("pretrain_llama2_pi.sh", {}),
    "yarn": ("pretrain_llama2_yarn.sh", {}),
}


def commands(methods: Sequence[str] = METHODS, seeds: int = 1) -> str:
    lengths = ",".join(map(str, PAPER_LENGTHS))
    data = "DATA_PATH=<upsampled mixture prefix> TOKENIZER_MODEL=<Llama-2 tokenizer.model>"
    lines = ["# Stage 0 is Llama-2-7B itself (4k, base 10k): convert it once (TP 4, the 7B default layout).",
             "tools/convert_hf_to_megatron.py --hf-dir <Llama-2-7b-hf> --out checkpoints/llama2-7b --tp 4",
             "# The training data: examples/prepare_long_context_data.sh (Fu et al.'s upsampled SlimPajama mix).", ""]
    for method in methods:
        script, settings = LAUNCHES[method]
        for seed in range(1, seeds + 1):
            run = f"llama2-7b-{method.replace('_', '-')}" + (f"-seed{seed}" if seeds > 1 else "")
            env = {**settings, "RUN_NAME": run, **({"SEED": str(1000 + seed)} if seeds > 1 else {})}
            lines += [f"# {LABELS[method]}" + (f", seed {seed}" if seeds > 1 else ""),
                      f"LOAD=checkpoints/llama2-7b {data} "
                      + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + f" examples/{script}",
                      f"tools/convert_megatron_to_hf.py --megatron-dir checkpoints/{run}"
                      + ("/stage3" if method == "abf_multistage" else "")
                      + f" --out hf/{run} --tokenizer-model <Llama-2 tokenizer.model> --allow-pickle",
                      f"tools/eval_niah.py --model hf/{run} --out eval/{run}/ruler --suite ruler --lengths {lengths}",
                      f"tools/eval_passkey.py --model hf/{run} --out eval/{run}/passkey --lengths {lengths}", ""]
    return "\n".join(lines)
