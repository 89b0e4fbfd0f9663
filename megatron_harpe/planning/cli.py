"""tools/plan_parallelism.py: which TP / PP / CP / DP and recompute settings fit, best first."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_harpe.command import RunError, UsageError, run_command
from megatron_harpe.planning.launch import format_env, launch_env, megatron_args
from megatron_harpe.planning.megatron_reference import megatron_estimate
from megatron_harpe.planning.memory import RECOMPUTE_CHOICES, ROPE_MEMORY
from megatron_harpe.planning.search import GIB, Hardware, Plan, Request, search
from megatron_harpe.shape import SHAPES, resolve_model

# The recipe's batch (Fu et al. 2024, followed by the paper): about 4M tokens per step.
TOKENS_PER_STEP = 4 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="List the parallel layouts (TP, PP, CP, DP) and recompute settings that fit a Llama model at a "
                    "sequence length on N GPUs, with memory per GPU and communication per iteration, best first.",
        allow_abbrev=False)  # --emit must not pass for --emit-env: its failures are told apart before parsing
    p.add_argument("--model", required=True, help=f"{', '.join(SHAPES)} or a config.json (Hugging Face Llama or "
                                                   "Megatron names: num_layers, hidden_size, ...)")
    p.add_argument("--seq-length", type=int, default=131072)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all (whole nodes beyond one node)")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GB",
                   help="memory of one GPU in GiB as the vendor counts it (80 for H100 80GB, 141 for H200)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int,
                   help=f"sequences per step (default: the recipe's {TOKENS_PER_STEP} tokens / seq-length, at least 1)")
    p.add_argument("--recompute", choices=("auto",) + RECOMPUTE_CHOICES, default="auto",
                   help="auto: per layout, the least recompute that fits (none, then block 1..L-1, then full)")
    p.add_argument("--recompute-layers", type=int, help="with --recompute block: layers per stage recomputed")
    p.add_argument("--tp", type=int, help="only layouts with this tensor-parallel size")
    p.add_argument("--pp", type=int, help="only layouts with this pipeline-parallel size")
    p.add_argument("--cp", type=int, help="only layouts with this context-parallel size")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="optimizer state replicated on every DP rank (the examples use the distributed optimizer)")
    p.add_argument("--baseline", action="store_true", help="plan megatron's single-base RoPE (ABF, PI, YaRN) instead "
                                                           "of HARPE")
    p.add_argument("--harpe-rope-impl", choices=tuple(ROPE_MEMORY), default="auto",
                   help="the trainer's --harpe-rope-impl: auto, torch, triton (HARPE's kernels, one memory model; "
                        "default auto) or unfused (megatron's unfused RoPE with per-head frequencies)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of GPU memory kept free for the CUDA context, NCCL, workspaces, fragmentation")
    p.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU (orders layouts)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU inside a node")
    p.add_argument("--network-gbps", type=float, default=50.0, help="GB/s per GPU between nodes")
    p.add_argument("--top", type=int, default=10, help="layouts to list")
    p.add_argument("--show-infeasible", action="store_true", help="also list layouts that do not fit, and why")
    p.add_argument("--compare-megatron", action="store_true",
                   help="add megatron.training.theoretical_memory_usage's estimate of each listed run (parsed from "
                        "examples/pretrain_llama2_harpe.sh --dry-run with the plan's settings)")
    p.add_argument("--emit-env", type=int, nargs="?", const=1, metavar="K",
                   help="print the examples/ environment variables of the K-th plan (default 1) and nothing else: "
                        "set -e; eval \"$(tools/plan_parallelism.py ... --emit-env)\"; "
                        "examples/pretrain_llama2_harpe.sh. On an error it prints `false` (eval fails; set -e "
                        "stops). The plan is for its --model (HARPE_PLAN_MODEL): a launch of another model refuses "
                        "it; unset $HARPE_PLAN_VARS drops it")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    return p


def request_from(args) -> tuple[Request, Hardware]:
    for name in ("seq_length", "gpus", "gpus_per_node", "micro_batch_size", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpu_memory <= 0:
        raise ValueError("--gpu-memory must be positive (GiB per GPU, e.g. 80)")
    if not 0 <= args.headroom < 1:
        raise ValueError("--headroom is a fraction in [0, 1), e.g. 0.1")
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus} is not a whole number of {args.gpus_per_node}-GPU nodes: "
                         f"use a multiple of --gpus-per-node")
    if args.recompute_layers is not None and args.recompute != "block":
        raise ValueError("--recompute-layers goes with --recompute block")
    shape = resolve_model(args.model)
    if args.recompute_layers is not None and not 1 <= args.recompute_layers <= shape.num_layers:
        raise ValueError(f"--recompute-layers must be in 1..{shape.num_layers}")
    gbs = args.global_batch_size or max(1, TOKENS_PER_STEP // args.seq_length)
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "cp") if getattr(args, k) is not None}
    request = Request(shape=shape, seq_length=args.seq_length, gpus=args.gpus, micro_batch_size=args.micro_batch_size,
                      global_batch_size=gbs, harpe=not args.baseline, rope_impl=args.harpe_rope_impl,
                      distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute,
                      recompute_layers=args.recompute_layers, fixed=fixed)
    hardware = Hardware(gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node, headroom=args.headroom,
                        tflops=args.tflops, nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps)
    return request, hardware


def plan_env(plan: Plan, request: Request, hardware: Hardware) -> dict[str, str]:
    return launch_env(request.shape, plan.layout, request.seq_length, request.global_batch_size,
                      hardware.gpus_per_node)


def megatron_columns(plan: Plan, request: Request, hardware: Hardware) -> str:
    try:
        static, activations = megatron_estimate(megatron_args(plan_env(plan, request, hardware)),
                                                plan.layout.num_microbatches)
    except Exception as e:  # a layout Megatron itself rejects is worth showing, not a crash
        return f"megatron: {str(e).splitlines()[0][:60]}"
    return f"{static / GIB:7.1f} {activations / GIB:7.1f} {(static + activations) / GIB:7.1f}"


HEADER = (" #   TP  PP  CP  DP  mb/it recompute  weights grads optim(dist|repl)  activ  work logits harpe(MiB)  total"
          " | comm GB: TP/CP/PP/DP     | step s")


def plan_row(index: int, plan: Plan) -> str:
    L, m, c = plan.layout, plan.memory, plan.comm
    return (f"{index:2d} {L.tp:4d}{L.pp:4d}{L.cp:4d}{L.dp:4d} {L.num_microbatches:6d} {L.recompute_label():9s}"
            f"{m.weights / GIB:8.1f}{m.gradients / GIB:6.1f}{m.optimizer_distributed / GIB:8.1f}|"
            f"{m.optimizer_replicated / GIB:<7.1f}{m.activations / GIB:7.1f}{m.workspace / GIB:6.1f}"
            f"{m.logits / GIB:7.1f}{m.harpe_overhead / 2 ** 20:11.1f}{m.total / GIB:7.1f}"
            f" | {c.tp / 1e9:6.0f}/{c.cp / 1e9:5.0f}/{c.pp / 1e9:4.0f}/{c.dp / 1e9:4.0f}     | {plan.step_seconds:6.1f}")


def describe(request: Request, hardware: Hardware) -> str:
    s = request.shape
    nodes = max(1, request.gpus // hardware.gpus_per_node)
    rope = ("megatron RoPE (baseline)" if not request.harpe
            else f"HARPE ({ROPE_MEMORY[request.rope_impl]} RoPE, {s.num_query_groups} bases)")
    return (f"{s.name}: {s.total_parameters() / 1e9:.2f}B parameters, {s.num_layers} layers, {s.num_attention_heads} "
            f"heads / {s.num_query_groups} query groups; {request.seq_length} tokens; {request.gpus} GPUs ({nodes} node"
            f"{'s' if nodes > 1 else ''}) of {hardware.gpu_memory_gib:g} GiB, {hardware.usable_bytes / GIB:.1f} usable; "
            f"micro-batch {request.micro_batch_size}, global batch {request.global_batch_size}; {rope}; "
            f"{'distributed' if request.distributed_optimizer else 'replicated'} optimizer")


def print_table(plans, request, hardware, args, out) -> None:
    fitting = [p for p in plans if p.fits]
    shown = (plans if args.show_infeasible else fitting)[:args.top]
    print(describe(request, hardware), file=out)
    print("Memory in GiB per GPU on the most loaded pipeline stage (optimizer: distributed over DP x CP | replicated; "
          "the total uses the configured one; harpe: RoPE memory minus megatron's single-base RoPE). Comm: GB sent "
          f"per GPU per iteration. Step: a model estimate to order layouts ({hardware.tflops:g} TFLOP/s, "
          f"{hardware.nvlink_gbps:g} GB/s in a node, {hardware.network_gbps:g} GB/s between nodes), not a measurement.",
          file=out)
    header = HEADER + (" | megatron's estimate GiB: w+opt activ total" if args.compare_megatron else "")
    print(header, file=out)
    for i, plan in enumerate(shown, 1):
        row = plan_row(i, plan)
        if args.compare_megatron:
            row += " | " + megatron_columns(plan, request, hardware)
        if not plan.fits:
            row += f"   does not fit: {plan.note}"
        print(row, file=out)
    unshown = len(fitting) - sum(p.fits for p in shown)
    if unshown:
        print(f"... {unshown} more layouts fit (--top)", file=out)
    if not args.show_infeasible and len(plans) > len(fitting):
        print(f"{len(plans) - len(fitting)} layouts do not fit even with full recompute (--show-infeasible)", file=out)


def wants_env(argv) -> bool:
    return any(a == "--emit-env" or a.startswith("--emit-env=") for a in argv)


def main(argv=None) -> int:
    """With --emit-env, a failure also prints ``false``: ``eval`` of an empty output would succeed."""
    from megatron_harpe.warning_filters import filter_unactionable_warnings

    filter_unactionable_warnings()  # the console script too, not only tools/plan_parallelism.py
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _main(argv)
    except SystemExit as e:  # argparse: a bad flag
        code = e.code
        if not wants_env(argv) or code in (None, 0):
            raise
    if code and wants_env(argv):
        print("false")
    return code


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _plan(args), usage=(ValueError,))  # shape, flag and layout checks raise ValueError


def _plan(args) -> None:
    request, hardware = request_from(args)
    plans, skipped = search(request, hardware)
    if not plans:
        why = "; ".join(skipped) or ("TP must divide the heads and query groups and stay inside a node, PP the layers, "
                                     "2 x CP the sequence length and TP its CP share")
        raise UsageError(f"no TP x PP x CP x DP layout of {request.gpus} GPUs is valid here ({why}): change --gpus, "
                         f"--tp/--pp/--cp, --global-batch-size or --seq-length")
    fitting = [p for p in plans if p.fits]
    if args.emit_env is not None:
        if not fitting:
            raise _no_fit(plans)
        if not 1 <= args.emit_env <= len(fitting):
            raise UsageError(f"--emit-env {args.emit_env}: {len(fitting)} layouts fit: choose K in 1..{len(fitting)}")
        print(format_env(plan_env(fitting[args.emit_env - 1], request, hardware), request.distributed_optimizer))
        return
    if args.json:
        shown = plans if args.show_infeasible else fitting
        print(json.dumps({"request": describe(request, hardware), "plans": [
            {"layout": vars(p.layout), "fits": p.fits, "note": p.note,
             "memory_bytes": p.memory.as_dict(), "comm_bytes": p.comm.as_dict(), "step_seconds": p.step_seconds,
             "env": plan_env(p, request, hardware)} for p in shown[:args.top]]}, indent=1))
    else:
        print_table(plans, request, hardware, args, sys.stdout)
        for line in skipped:
            print(f"not considered: {line}")
    if not fitting:
        raise _no_fit(plans)


def _no_fit(plans) -> RunError:
    closest = min(plans, key=lambda p: p.memory.total)
    return RunError(f"no layout fits (closest: {closest.note}): add GPUs, shorten --seq-length, or lower "
                    f"--micro-batch-size")
