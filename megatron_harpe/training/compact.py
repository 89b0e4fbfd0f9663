"""The compact engine: Megatron-LM's pretraining loop in a page, on megatron-core, for CPUs (and GPUs).

``megatron.training.pretrain`` needs CUDA. This loop takes the same parsed flags and runs the same pieces —
megatron-core's ``DistributedDataParallel``, ``get_megatron_optimizer`` (AdamW, gradient clipping),
``OptimizerParamScheduler`` (Megatron's LR schedule), ``get_forward_backward_func`` (TP, PP, CP, micro-batches),
the GPT datasets — and saves and resumes with ``megatron.training.checkpointing`` (``torch_dist`` or ``torch``),
so its checkpoints are Megatron-LM checkpoints. On a CPU it runs over gloo inside
:func:`~megatron_harpe.cpu_compat.megatron_on_cpu`. Flags it cannot honour are refused up front
(:func:`check_compact_args`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.rerun_state_machine import get_rerun_state_machine

from megatron_harpe.arguments import HarpeArgumentError
from megatron_harpe.cpu_compat import megatron_on_cpu, prepare_args_for_cpu
from megatron_harpe.distributed import init_from_environment
from megatron_harpe.training.data import train_valid_test_datasets_provider
from megatron_harpe.training.forward_step import forward_step
from megatron_harpe.model_from_args import build_model


class UnsupportedFlagError(HarpeArgumentError):
    """A Megatron-LM flag the compact engine does not implement."""


def _unsupported(args: argparse.Namespace, on_cpu: bool) -> list[str]:
    problems = []

    def refuse(condition, flag, what_to_do):
        if condition:
            problems.append(f"{flag}: {what_to_do}")

    refuse(args.virtual_pipeline_model_parallel_size is not None or args.num_layers_per_virtual_pipeline_stage,
           "--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank",
           "interleaved pipelines need --harpe-engine megatron")
    refuse(getattr(args, "num_experts", None), "--num-experts", "MoE is not part of Llama-2; drop it")
    refuse(getattr(args, "fp8", None), "--fp8-format", "FP8 needs Transformer Engine and --harpe-engine megatron")
    refuse(args.use_torch_fsdp2 or args.use_megatron_fsdp, "--use-torch-fsdp2 / --use-megatron-fsdp",
           "use --harpe-engine megatron")
    refuse(args.async_save, "--async-save", "drop it (the compact engine saves synchronously)")
    refuse(args.exit_duration_in_mins, "--exit-duration-in-mins", "use --exit-interval")
    refuse(args.train_iters is None, "--train-samples", "the compact engine counts iterations: give --train-iters")
    refuse(args.skip_train, "--skip-train", "the compact engine trains; evaluate with tools/eval_*.py")
    refuse(args.full_validation or args.multiple_validation_sets, "--full-validation / --multiple-validation-sets",
           "the compact engine evaluates --eval-iters batches of one validation set: use --harpe-engine megatron")
    refuse(args.ckpt_format not in ("torch_dist", "torch"), f"--ckpt-format {args.ckpt_format}",
           "use torch_dist (default) or torch")
    if on_cpu:
        refuse(args.fp16 or args.bf16, "--fp16 / --bf16", "the CPU runs in fp32: drop the flag")
        refuse(args.sequence_parallel, "--sequence-parallel",
               "gloo has no reduce-scatter: drop it on the CPU (it changes memory, not results)")
        refuse(args.use_distributed_optimizer, "--use-distributed-optimizer", "drop it on the CPU")
        refuse(args.overlap_grad_reduce or args.overlap_param_gather, "--overlap-grad-reduce / --overlap-param-gather",
               "overlap needs CUDA streams: drop it on the CPU")
        refuse(args.tp_comm_overlap, "--tp-comm-overlap", "drop it on the CPU")
    return problems


def check_compact_args(args: argparse.Namespace) -> None:
    """Refuse, all at once, the flags this engine does not implement."""
    problems = _unsupported(args, on_cpu=not torch.cuda.is_available())
    if problems:
        raise UnsupportedFlagError(
            "the compact engine does not support these flags:\n  " + "\n  ".join(problems))


def _set_seed(args: argparse.Namespace) -> None:
    """Megatron's seeding; on a CPU also the (empty) CUDA RNG tracker states its checkpoints expect."""
    from megatron.core import tensor_parallel
    from megatron.training.initialize import _set_random_seed

    _set_random_seed(args.seed, args.data_parallel_random_init)
    if not torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(
            args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())


def _init_rerun_state_machine(args: argparse.Namespace) -> None:
    """megatron.training's rerun state machine (``--rerun-mode``, ``--error-injection-*``), as ``initialize_megatron``."""
    from megatron.core import tensor_parallel
    from megatron.core.rerun_state_machine import (RerunDiagnostic, RerunErrorInjector, RerunMode,
                                                   destroy_rerun_state_machine, initialize_rerun_state_machine)

    def state_save_func():
        return {"rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def state_restore_func(state_dict):
        if state_dict["rng_tracker_states"]:
            tensor_parallel.get_cuda_rng_tracker().set_states(state_dict["rng_tracker_states"])

    destroy_rerun_state_machine()  # a process may train twice (tests); megatron's own is initialised once
    initialize_rerun_state_machine(
        state_save_func=state_save_func, state_restore_func=state_restore_func, mode=RerunMode(args.rerun_mode),
        error_injector=RerunErrorInjector(error_injection_rate=args.error_injection_rate,
                                          error_injection_type=RerunDiagnostic(args.error_injection_type)),
        result_rejected_tracker_filename=args.result_rejected_tracker_filename)


def _build(args: argparse.Namespace):
    from megatron.core.transformer.module import Float16Module
    from megatron.training.training import (get_megatron_ddp_config, get_megatron_optimizer_config,
                                            get_optimizer_param_scheduler)

    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    module = build_model(args, pre, post)
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    config = module.config
    if args.fp16 or args.bf16:
        module = Float16Module(config, module)
    ddp_config = get_megatron_ddp_config(args)
    model = [DistributedDataParallel(config, ddp_config, module,
                                     disable_bucketing=parallel_state.get_pipeline_model_parallel_rank() > 0)]
    optimizer_config, config_overrides = get_megatron_optimizer_config(args)
    optimizer = get_megatron_optimizer(optimizer_config, model, config_overrides=config_overrides)
    scheduler = get_optimizer_param_scheduler(optimizer)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler, config


def _reduce_losses(losses_reduced: list[dict]) -> dict[str, float]:
    """Token-weighted mean of each reported loss over micro-batches and data-parallel (x CP) ranks."""
    out = {}
    if not losses_reduced:
        return out
    for key in losses_reduced[0]:
        total = torch.stack([x[key].view(-1) for x in losses_reduced]).sum(0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        out[key] = (total[0] / total[1].clamp(min=1)).item()
    return out


class MetricsLog:
    """One JSON line per logged iteration, written by the last rank (``--harpe-metrics-file``)."""

    def __init__(self, path: str | None):
        self.path = path if path and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1 else None

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@dataclass
class _Run:
    """What the step loop works with, once set up."""

    args: argparse.Namespace
    model: list
    optimizer: object
    scheduler: object
    train_iter: object
    valid_iter: object
    step_func: Callable
    forward_backward: Callable
    metrics: MetricsLog

    def save(self, iteration: int) -> None:
        from megatron.training.checkpointing import save_checkpoint

        save_checkpoint(iteration, self.model, self.optimizer, self.scheduler,
                        self.args.num_floating_point_operations_so_far, checkpointing_context={})


def train(args: argparse.Namespace, datasets_provider: Callable = train_valid_test_datasets_provider,
          step_func: Callable = forward_step) -> dict:
    """Run the compact engine with parsed and validated Megatron ``args``; returns the last iteration's metrics."""
    _prepare(args)
    with megatron_on_cpu():
        run = _set_up(args, datasets_provider, step_func)
        last = _train_loop(run)
    torch.distributed.barrier()
    return last


def _prepare(args: argparse.Namespace) -> None:
    """Refuse what the engine cannot do, fit the flags to the machine, join the job's process group."""
    check_compact_args(args)
    if not torch.cuda.is_available():
        prepare_args_for_cpu(args)
    if args.eval_interval is None:  # megatron's sample counts need it; evaluate once, at the end
        args.eval_interval = args.train_iters
    init_from_environment(args)


def _set_up(args: argparse.Namespace, datasets_provider: Callable, step_func: Callable) -> _Run:
    """megatron.training's set-up in its order: seed, globals, rerun state machine, model and optimizer, the
    checkpoint to resume from, the data iterators."""
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import build_train_valid_test_data_iterators
    from megatron.training.utils import print_rank_0

    from megatron_harpe.training.entry import load_or_raise

    metrics = MetricsLog(getattr(args, "harpe_metrics_file", None))
    _set_seed(args)
    set_global_variables(args, build_tokenizer=True)
    _init_rerun_state_machine(args)
    model, optimizer, scheduler, _ = _build(args)
    args.iteration, args.num_floating_point_operations_so_far = 0, 0
    if args.load is not None or args.pretrained_checkpoint is not None:
        # a failed load is megatron's bare sys.exit(): status 0
        args.iteration, args.num_floating_point_operations_so_far = load_or_raise(load_checkpoint)(
            model, optimizer, scheduler)
    print_rank_0(f"compact engine: {args.world_size} rank(s) (TP {args.tensor_model_parallel_size}, "
                 f"PP {args.pipeline_model_parallel_size}, CP {args.context_parallel_size}, "
                 f"DP {args.data_parallel_size}) on {'CUDA' if torch.cuda.is_available() else 'CPU/gloo'}, "
                 f"starting at iteration {args.iteration}")
    get_rerun_state_machine().current_iteration = args.iteration  # as megatron's train() after a load
    train_iter, valid_iter, _ = build_train_valid_test_data_iterators(datasets_provider)
    if isinstance(valid_iter, list):  # TP ranks > 0 hold no iterator but take part through broadcasts
        valid_iter = valid_iter[0] if valid_iter else None
    return _Run(args, model, optimizer, scheduler, train_iter, valid_iter, step_func, get_forward_backward_func(),
                metrics)


def _train_loop(run: _Run) -> dict:
    """megatron's train(): step, log, evaluate and save at their intervals, until --train-iters or --exit-interval."""
    from megatron.training.utils import print_rank_0

    args = run.args
    last = {}
    window_start, window_tokens = time.time(), 0
    saved_at = None
    while args.iteration < args.train_iters:
        losses, grad_norm = _train_step(run)
        iteration = args.iteration
        window_tokens += args.global_batch_size * args.seq_length
        reduced = _reduce_losses(losses) if parallel_state.is_pipeline_last_stage() else {}
        # A NaN/Inf loss already stopped the step in loss_func (megatron's rerun state machine), unless
        # --no-check-for-nan-in-loss-and-grad asked to go on, as megatron.training does.
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            last = _log(run, grad_norm, reduced, tokens_per_s=window_tokens / max(time.time() - window_start, 1e-9))
            window_start, window_tokens = time.time(), 0
        if args.do_valid and args.eval_iters and iteration % args.eval_interval == 0:
            evaluate(args, run.model, run.valid_iter, run.step_func, run.forward_backward, get_num_microbatches(),
                     iteration, run.metrics)
        exiting = bool(args.exit_interval and iteration % args.exit_interval == 0)
        if args.save and ((args.save_interval and iteration % args.save_interval == 0)
                          or exiting or iteration == args.train_iters):
            run.save(iteration)
            saved_at = iteration
            window_start = time.time()  # throughput excludes checkpoint time
        if exiting:
            print_rank_0(f"exiting at iteration {iteration} (--exit-interval)")
            break
    if saved_at is not None:
        print_rank_0(f"checkpoint at iteration {saved_at} in {args.save}")
    return last


def _train_step(run: _Run):
    """megatron's train_step: forward-backward (re-run while the rerun state machine rejects the result), then
    the optimizer and LR steps; ``(losses, grad norm)``. Advances ``args.iteration`` and the sample count."""
    from megatron.training.utils import print_rank_0

    args = run.args
    rerun_state_machine = get_rerun_state_machine()
    while rerun_state_machine.should_run_forward_backward(run.train_iter):
        for chunk in run.model:
            chunk.zero_grad_buffer()
        run.optimizer.zero_grad()
        losses = run.forward_backward(
            forward_step_func=run.step_func, data_iterator=run.train_iter, model=run.model,
            num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, decoder_seq_length=args.decoder_seq_length,
            forward_only=False)
    should_checkpoint, should_exit, exit_code = rerun_state_machine.should_checkpoint_and_exit()
    if should_exit:
        if should_checkpoint and args.save:
            run.save(args.iteration)
        print_rank_0(f"exiting at iteration {args.iteration} with exit status {exit_code}: the rerun state "
                     "machine rejected a result (--rerun-mode)")
        raise SystemExit(exit_code)
    update_ok, grad_norm, _ = run.optimizer.step()
    if update_ok:
        run.scheduler.step(increment=args.global_batch_size)
    args.iteration += 1
    args.consumed_train_samples += args.global_batch_size
    return losses, grad_norm


def _log(run: _Run, grad_norm, reduced: dict[str, float], tokens_per_s: float) -> dict:
    """Megatron's log line for the iteration just done, and its metrics record."""
    from megatron.training.utils import print_rank_last

    args = run.args
    record = {"iteration": args.iteration, "lr": run.optimizer.param_groups[0]["lr"],
              "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "tokens_per_s": tokens_per_s, **reduced}
    print_rank_last(
        f" iteration {args.iteration:8d}/{args.train_iters:8d} | consumed samples: "
        f"{args.consumed_train_samples:10d} | learning rate: {record['lr']:.6E} | "
        + "".join(f"{k}: {v:.6E} | " for k, v in reduced.items())
        + f"grad norm: {record['grad_norm'] or 0:.3f} | tokens/s: {record['tokens_per_s']:.1f}")
    run.metrics.write(record)
    return record


def evaluate(args, model, valid_iter, step_func, forward_backward, num_microbatches, iteration, metrics) -> None:
    from megatron.training.utils import print_rank_last

    from megatron.core.rerun_state_machine import RerunMode

    for chunk in model:
        chunk.eval()
    totals = []
    # As megatron's evaluate: validation results are checked (NaN is fatal) but never re-run.
    rerun_state_machine = get_rerun_state_machine()
    rerun_mode = rerun_state_machine.get_mode()
    rerun_state_machine.set_mode(RerunMode.DISABLED)
    try:
        with torch.no_grad():
            for _ in range(args.eval_iters):
                totals += forward_backward(forward_step_func=step_func, data_iterator=valid_iter, model=model,
                                           num_microbatches=num_microbatches, seq_length=args.seq_length,
                                           micro_batch_size=args.micro_batch_size, forward_only=True)
    finally:
        rerun_state_machine.set_mode(rerun_mode)
    for chunk in model:
        chunk.train()
    if parallel_state.is_pipeline_last_stage():
        reduced = _reduce_losses(totals)
        print_rank_last(f" validation at iteration {iteration} | "
                        + " | ".join(f"{k}: {v:.6E} | {k} PPL: {math.exp(min(20, v)):.6E}" for k, v in reduced.items()))
        metrics.write({"iteration": iteration, "split": "valid", **reduced})
