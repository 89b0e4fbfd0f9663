"""Megatron-LM checkpoints for a Llama: the args megatron.training expects, and the two formats written and read.

``torch``: ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tensor, pipeline) rank, written one rank at a time, so
memory stays near one rank's shard (plus one full layer). ``torch_dist``: megatron-core's ``dist_checkpointing``,
layout-free (any TP/PP loads it); written from a TP=1 model built in this process, so it needs the whole model in
memory. Converted checkpoints are ``release`` checkpoints: train from them with ``--finetune --no-load-optim
--no-load-rng`` (``--pretrained-checkpoint`` in examples/).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import io
import logging
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_harpe.convert.hf_checkpoint import DTYPES
from megatron_harpe.convert.mapping import (
    EXTRA_STATE_MODULES,
    GLOBAL_TABLE,
    LAYER_TABLE,
    ConversionError,
    LlamaShape,
    full_megatron_state,
    hf_layer_name,
    megatron_layer_name,
    merge_tp,
    padded_vocab_size,
    parse_layer_key,
    split_tp,
    stage_has,
    stage_layers,
    to_hf,
    to_megatron,
)

TRACKER = "latest_checkpointed_iteration.txt"


def megatron_args(shape: LlamaShape, *, tp: int, pp: int, dtype: str, ckpt_format: str, transformer_impl: str,
                  seq_length: int, harpe_args: List[str]) -> argparse.Namespace:
    """The Namespace Megatron-LM's parser and validate_args give a Llama-2 run with these settings."""
    from megatron_harpe.training.entry import parse_and_validate

    argv = ["--num-layers", shape.num_layers, "--hidden-size", shape.hidden_size,
            "--ffn-hidden-size", shape.ffn_hidden_size, "--num-attention-heads", shape.num_attention_heads,
            "--seq-length", seq_length, "--max-position-embeddings", seq_length,
            "--position-embedding-type", "rope", "--rotary-base", int(shape.rope_theta),
            "--normalization", "RMSNorm", "--norm-epsilon", shape.norm_eps, "--swiglu", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, "--micro-batch-size", "1",
            "--ckpt-format", ckpt_format, "--transformer-impl", transformer_impl, "--vocab-size", shape.vocab_size,
            "--tokenizer-type", "NullTokenizer", *harpe_args]
    if shape.num_query_groups != shape.num_attention_heads:
        argv += ["--group-query-attention", "--num-query-groups", shape.num_query_groups]
    if dtype in ("bf16", "fp16"):
        argv.append(f"--{dtype}")
    saved_argv, saved_world = sys.argv, os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(tp * pp)  # validate_args checks the layout against the world size
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
            args = parse_and_validate([str(a) for a in argv])
    finally:
        sys.argv = saved_argv
        if saved_world is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved_world
    args.padded_vocab_size = padded_vocab_size(shape.vocab_size, tp, args.make_vocab_size_divisible_by)
    return args


def run_dtype(args: argparse.Namespace) -> str:
    """The run's parameter precision, spelled as ``--dtype`` takes it."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def shape_from_args(args: argparse.Namespace, vocab_size: Optional[int] = None,
                    vocab_flags: str = "--vocab-size") -> LlamaShape:
    """The Llama the saved args describe; ``vocab_flags`` names the calling command's way to give the vocabulary."""
    vocab = vocab_size or getattr(args, "vocab_size", None)
    if not vocab:
        raise ConversionError("the checkpoint's args do not record the true vocabulary size (only the padded "
                              f"{args.padded_vocab_size}): pass {vocab_flags}")
    if int(vocab) > args.padded_vocab_size:
        raise ConversionError(f"vocabulary {vocab} is larger than the checkpoint's {args.padded_vocab_size} embedding "
                              f"rows: pass {vocab_flags} of the tokenizer the model was trained with")
    if args.position_embedding_type != "rope" or not args.swiglu or args.normalization != "RMSNorm":
        raise ConversionError("the checkpoint is not a Llama (RoPE, SwiGLU, RMSNorm)")
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    return LlamaShape(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                      num_attention_heads=args.num_attention_heads, num_query_groups=groups, vocab_size=int(vocab),
                      max_position_embeddings=args.max_position_embeddings, rope_theta=float(args.rotary_base),
                      norm_eps=float(args.layernorm_epsilon))


def _checkpoint_name(root: str, tp_rank: int, pp_rank: int, pp: int) -> str:
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(root, 0, release=True, pipeline_parallel=pp > 1, tensor_rank=tp_rank,
                               pipeline_rank=pp_rank)


def _write_tracker(root: str) -> None:
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("release")


def write_torch(root: str, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, args: argparse.Namespace,
                dtype: torch.dtype, progress: Callable[[int], None] = lambda n: None) -> None:
    """One ``model_optim_rng.pt`` per (TP, PP) rank, built rank by rank from the Hugging Face tensors."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    impl = args.transformer_impl
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state = {}
            for megatron, hf, combination, where in GLOBAL_TABLE:
                if stage_has(where, pp, pp_rank):
                    full = to_megatron(combination, [read_hf(hf)], shape, args.padded_vocab_size)
                    state[megatron] = _compact(split_tp(megatron, full.to(dtype), tp)[tp_rank])
                    progress(1)
            if stage_has("last", pp, pp_rank):
                state["output_layer._extra_state"] = None
            for local, layer in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
                for megatron, hf_names, combination in LAYER_TABLE:
                    full = to_megatron(combination, [read_hf(hf_layer_name(layer, n)) for n in hf_names], shape,
                                       args.padded_vocab_size)
                    key = megatron_layer_name(local, megatron, impl)
                    state[key] = _compact(split_tp(megatron, full.to(dtype), tp)[tp_rank])
                for module in EXTRA_STATE_MODULES[impl]:
                    state[f"decoder.layers.{local}.{module}._extra_state"] = None
                progress(1)
            path = _checkpoint_name(root, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _without_crc32():
                torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": state}, path)
    _write_tracker(root)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` alone in its storage (torch.save writes a view's whole storage, i.e. every TP rank's rows)."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _without_crc32():
    """torch.save spends ~3/4 of its time on zip CRC32s; loading does not need them (torch.load skips absent ones)."""
    from torch.utils.serialization import config

    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = saved


def write_torch_dist(root: str, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, args: argparse.Namespace,
                     dtype: torch.dtype) -> None:
    """A layout-free ``torch_dist`` checkpoint, saved by megatron-core from a TP=1 model built here."""
    from megatron.core import dist_checkpointing

    from megatron_harpe.sharding import load_full_state_dict

    full = {k: v.to(dtype) for k, v in full_megatron_state(read_hf, shape, args.padded_vocab_size).items()}
    with _single_rank_model(args, dtype) as model:
        load_full_state_dict(model, full, 0, 1, gated_linear_unit=True)
        del full
        path = os.path.join(root, "release")
        os.makedirs(path, exist_ok=True)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model.sharded_state_dict()}
        with _writer_errors(path):
            dist_checkpointing.save(state, path)
    _write_tracker(root)


class _ErrorLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _writer_errors(path: str):
    """Keep the cause of a failed torch_dist write. megatron-core's file writer turns a worker's OSError into an
    assertion on its type (filesystem_async.py ``check_local_output``), keeping the errno only in a log line."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    lines = _ErrorLines()
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    logger.addHandler(lines)
    try:
        yield
    except (Exception, CheckpointException) as e:
        for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")):
            if any(text in line or f"[Errno {code}]" in line for line in lines.lines):
                raise OSError(code, os.strerror(code), path) from e
        raise
    finally:
        logger.removeHandler(lines)


class _single_rank_model:
    """The model ``args`` describe at TP=PP=1 in this process (a gloo world of one), torn down afterwards."""

    def __init__(self, args: argparse.Namespace, dtype: torch.dtype):
        self.args = argparse.Namespace(**vars(args))
        self.args.tensor_model_parallel_size = self.args.pipeline_model_parallel_size = 1
        self.args.params_dtype = dtype
        self.args.transformer_impl = "local"  # no TE needed; torch_dist keys are the same for both specs
        self.args.perform_initialization = False  # every weight is overwritten: skip megatron's random init

    def __enter__(self):
        from megatron.core import parallel_state

        from megatron_harpe.cpu_compat import megatron_on_cpu
        from megatron_harpe.distributed import free_port, init_model_parallel, init_process_group
        from megatron_harpe.training.model_provider import build_model

        self.own_world = not torch.distributed.is_initialized()
        if self.own_world:
            init_process_group(0, 1, free_port())
        self.had_parallel_state = parallel_state.model_parallel_is_initialized()
        if not self.had_parallel_state:
            init_model_parallel(1, 1, 1)
        if not torch.cuda.is_available():
            from megatron_harpe.training.compact import prepare_args_for_cpu

            prepare_args_for_cpu(self.args)
        self.cpu = megatron_on_cpu()
        self.cpu.__enter__()
        return build_model(self.args)

    def __exit__(self, *exc):
        from megatron.core import parallel_state

        self.cpu.__exit__(*exc)
        if not self.had_parallel_state:
            parallel_state.destroy_model_parallel()
        if self.own_world:
            torch.distributed.destroy_process_group()
        return False


# --- reading ---------------------------------------------------------------------------------------------------

def read_args(root: str, iteration: Optional[int] = None,
              allow_pickle: bool = False) -> Tuple[str, str, argparse.Namespace]:
    """``(iteration directory, format, saved args)`` of a Megatron-LM checkpoint (torch_dist needs ``allow_pickle``)."""
    from megatron_harpe.training.checkpoint import checkpoint_format, iteration_dir, load_checkpoint_args

    path = iteration_dir(root, iteration)
    return path, checkpoint_format(path), load_checkpoint_args(root, iteration, allow_pickle=allow_pickle)


def torch_rank_files(path: str, tp: int, pp: int) -> Dict[Tuple[int, int], str]:
    files = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
            file = os.path.join(path, name, "model_optim_rng.pt")
            if not os.path.isfile(file):
                raise ConversionError(f"{file} is missing: the checkpoint was saved at TP={tp} PP={pp} and needs "
                                      "every rank's file")
            files[tp_rank, pp_rank] = file
    found = len(glob.glob(os.path.join(path, "mp_rank_*", "model_optim_rng.pt")))
    if found != tp * pp:
        raise ConversionError(f"{path} holds {found} rank files, its args say TP={tp} x PP={pp}")
    return files


def megatron_full_tensors(path: str, fmt: str, args: argparse.Namespace,
                          allow_pickle: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)`` stage by stage: ``torch`` files are memory-mapped and merged
    across TP one stage at a time; ``torch_dist`` is loaded into a TP=1 model (the whole model in memory).
    Nothing is unpickled beyond tensors and Megatron's own types without ``allow_pickle`` (torch_dist needs it)."""
    from megatron_harpe.training.checkpoint import load_torch_dist, load_torch_file, require_pickle_opt_in

    if fmt == "torch_dist":
        require_pickle_opt_in(path, allow_pickle)
        with _single_rank_model(args, DTYPES[run_dtype(args)]) as model:
            loaded = load_torch_dist({"model": model.sharded_state_dict()}, path, allow_pickle)["model"]
            model.load_state_dict(loaded, strict=False)
            for name, tensor in model.state_dict().items():
                if not name.endswith("_extra_state"):
                    yield name, tensor
        return
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files = torch_rank_files(path, tp, pp)
    for pp_rank in range(pp):
        ranks = [load_torch_file(files[tp_rank, pp_rank], allow_pickle, mmap=True)["model"] for tp_rank in range(tp)]
        first_layer = stage_layers(args.num_layers, pp, pp_rank).start
        for key in ranks[0]:
            if key.endswith("_extra_state"):
                continue
            parsed = parse_layer_key(key)
            name = key if parsed is None else megatron_layer_name(first_layer + parsed[0], parsed[1])
            yield name, merge_tp(name, [r[key] for r in ranks])
        del ranks


def hf_tensors(megatron: Iterator[Tuple[str, torch.Tensor]], shape: LlamaShape) -> Iterator[Tuple[str, torch.Tensor]]:
    """Hugging Face ``(name, tensor)`` from full megatron tensors (any order)."""
    layer_rows = {m: (hf, c) for m, hf, c in LAYER_TABLE}
    global_rows = {m: (hf, c) for m, hf, c, _ in GLOBAL_TABLE}
    for name, tensor in megatron:
        if name in global_rows:
            hf, combination = global_rows[name]
            yield hf, to_hf(combination, tensor, shape)[0]
            continue
        parsed = parse_layer_key(name)
        if parsed is None or parsed[1] not in layer_rows:
            raise ConversionError(f"unexpected tensor {name} in the checkpoint: not a Llama parameter")
        layer, local_name = parsed
        hf_names, combination = layer_rows[local_name]
        for hf_name, part in zip(hf_names, to_hf(combination, tensor, shape)):
            yield hf_layer_name(layer, hf_name), part
