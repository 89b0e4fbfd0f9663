#!/usr/bin/env python
"""tools/plan_parallelism.py's memory estimate beside megatron.training.theoretical_memory_usage, same runs.

    python benchmarks/planner.py

Each run is what examples/pretrain_llama2_harpe.sh launches (its --dry-run, parsed by Megatron with
validate_args): the examples' default layouts (full recompute, CP > 1) and CP = 1 variants with selective
recompute, where Megatron's activation formula applies. GiB per GPU, most loaded pipeline stage. A GPU
measurement of the same kind is in benchmarks/gpu_check.sh (planner estimate next to max allocated).
"""

from __future__ import annotations

from megatron_harpe.planning.launch import megatron_args
from megatron_harpe.planning.megatron_reference import compare

RUNS = [
    # label, environment of the launch script
    ("7B default: TP4 CP2, full", dict(MODEL="7b", NNODES="1", TP="4", PP="1", CP="2", RECOMPUTE="full")),
    ("13B default: TP8 CP2, full", dict(MODEL="13b", NNODES="2", TP="8", PP="1", CP="2", RECOMPUTE="full")),
    ("70B default: TP8 PP4 CP4, full", dict(MODEL="70b", NNODES="16", TP="8", PP="4", CP="4", RECOMPUTE="full")),
    ("7B 32k: TP8, selective", dict(MODEL="7b", NNODES="1", TP="8", PP="1", CP="1", RECOMPUTE="selective",
                                    SEQ_LENGTH="32768")),
    ("13B 32k: TP8 PP2, selective", dict(MODEL="13b", NNODES="2", TP="8", PP="2", CP="1", RECOMPUTE="selective",
                                         SEQ_LENGTH="32768")),
    ("70B 32k: TP8 PP4, selective", dict(MODEL="70b", NNODES="16", TP="8", PP="4", CP="1", RECOMPUTE="selective",
                                         SEQ_LENGTH="32768")),
]


def main() -> None:
    rows = []
    for label, env in RUNS:
        r = {k: v / 1024 for k, v in compare(megatron_args({"GPUS_PER_NODE": "8", **env})).items()}
        rows.append(f"| {label} | {r['ours_weights_and_optimizer_mib']:.1f} | {r['megatron_weights_and_optimizer_mib']:.1f}"
                    f" | {r['ours_activations_mib']:.1f} | {r['megatron_activations_mib']:.1f}"
                    f" | {r['ours_total_mib']:.1f} | {r['megatron_total_mib']:.1f} |")
    print("| run | weights+grads+optimizer: ours | Megatron | activations: ours | Megatron | total: ours | Megatron |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
