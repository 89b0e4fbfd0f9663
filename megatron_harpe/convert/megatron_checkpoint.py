"""Megatron-LM checkpoints for a Llama: the args megatron.training expects, and the two formats written and read.

``torch``: ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tensor, pipeline) rank, written one rank at a time, so
memory stays near one rank's shard (plus one full layer). ``torch_dist``: megatron-core's ``dist_checkpointing``,
layout-free (any TP/PP loads it); written from a TP=1 model built in this process, so it needs the whole model in
memory. Converted checkpoints are ``release`` checkpoints: train from them with ``--finetune --no-load-optim
--no-load-rng`` (``--pretrained-checkpoint`` in examples/). Where the files go: :mod:`megatron_harpe.checkpoint_layout`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator

import torch

from megatron_harpe.checkpoint_layout import (load_torch_dist, load_torch_file, rank_file, release_dir,
                                              require_pickle_opt_in, torch_rank_files, write_release_tracker)
from megatron_harpe.checkpoint_model import single_rank_model
from megatron_harpe.convert.hf_checkpoint import DTYPES
from megatron_harpe.convert.mapping import (
    EXTRA_STATE_MODULES,
    GLOBAL_TABLE,
    LAYER_TABLE,
    ConversionError,
    full_megatron_state,
    hf_layer_name,
    megatron_layer_name,
    merge_tp,
    parse_layer_key,
    split_tp,
    stage_has,
    stage_layers,
    to_hf,
    to_megatron,
)
from megatron_harpe.shape import LlamaShape, ShapeError

# Llama-2's architecture beyond its sizes and RoPE, as megatron spells it; dropout off (conversion trains nothing).
LLAMA2_FLAGS = ("--normalization", "RMSNorm", "--swiglu",
                "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
                "--hidden-dropout", "0")


def megatron_args(shape: LlamaShape, *, tp: int, pp: int, dtype: str, ckpt_format: str, transformer_impl: str,
                  seq_length: int, harpe_bases: list[float] | None) -> argparse.Namespace:
    """The Namespace Megatron-LM's parser and validate_args give a Llama-2 run with these settings (the shape's
    RoPE scaling as megatron's flags), with ``harpe_bases`` (already resolved; None: standard RoPE) where the
    trainer's parse puts them."""
    from megatron_harpe.bases import validate_bases
    from megatron_harpe.convert.rope_scaling import megatron_rope_flags, refuse_with_harpe
    from megatron_harpe.megatron_args import parse_megatron_args

    if shape.rope_theta != int(shape.rope_theta):  # megatron parses --rotary-base as an integer
        raise ConversionError(f"rope_theta {shape.rope_theta:g}: megatron's --rotary-base takes an integer")
    refuse_with_harpe(shape.rope_scaling, harpe_bases)  # a ShapeError: bad usage (exit 2), as in the trainer
    flags = [*shape.to_megatron_flags(), *LLAMA2_FLAGS, *megatron_rope_flags(shape.rope_scaling),
             "--rotary-base", int(shape.rope_theta),
             "--norm-epsilon", shape.norm_eps, "--seq-length", seq_length, "--max-position-embeddings", seq_length,
             "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, "--micro-batch-size", 1,
             "--ckpt-format", ckpt_format, "--transformer-impl", transformer_impl, "--vocab-size", shape.vocab_size,
             "--tokenizer-type", "NullTokenizer"]
    if dtype in ("bf16", "fp16"):
        flags.append(f"--{dtype}")
    args = parse_megatron_args([str(f) for f in flags], world_size=tp * pp)
    if harpe_bases is not None:
        args.harpe_bases = validate_bases(list(harpe_bases), shape.num_query_groups)
    args.padded_vocab_size = shape.padded_vocab_size(tp, args.make_vocab_size_divisible_by)
    return args


def run_dtype(args: argparse.Namespace) -> str:
    """The run's parameter precision, spelled as ``--dtype`` takes it."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def checkpoint_shape(args: argparse.Namespace, vocab_size: int | None = None,
                     vocab_flags: str = "--vocab-size") -> LlamaShape:
    """The Llama the saved args describe; ``vocab_flags`` names the calling command's way to give the vocabulary."""
    try:
        return LlamaShape.from_megatron_args(args, vocab_size)
    except ShapeError as e:
        message = str(e)
        if "vocabulary" in message:  # what is wrong is shape.py's to say; which flag gives it, this command's
            message += f": pass {vocab_flags}" + (" of the tokenizer the model was trained with"
                                                  if "larger" in message else "")
        raise ConversionError(message) from None


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
                    state[megatron] = _own_storage(split_tp(megatron, full.to(dtype), tp)[tp_rank])
                    progress(1)
            if stage_has("last", pp, pp_rank):
                state["output_layer._extra_state"] = None
            for local, layer in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
                for megatron, hf_names, combination in LAYER_TABLE:
                    full = to_megatron(combination, [read_hf(hf_layer_name(layer, n)) for n in hf_names], shape,
                                       args.padded_vocab_size)
                    key = megatron_layer_name(local, megatron, impl)
                    state[key] = _own_storage(split_tp(megatron, full.to(dtype), tp)[tp_rank])
                for module in EXTRA_STATE_MODULES[impl]:
                    state[f"decoder.layers.{local}.{module}._extra_state"] = None
                progress(1)
            path = rank_file(root, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _without_crc32():
                torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": state}, path)
    write_release_tracker(root)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
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
    with single_rank_model(args, dtype) as model:
        load_full_state_dict(model, full, 0, 1, gated_linear_unit=True)
        del full
        path = release_dir(root)
        os.makedirs(path, exist_ok=True)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model.sharded_state_dict()}
        with _writer_errors(path):
            dist_checkpointing.save(state, path)
    write_release_tracker(root)


class _ErrorLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

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


# --- reading ---------------------------------------------------------------------------------------------------

def megatron_full_tensors(path: str, fmt: str, args: argparse.Namespace,
                          allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)`` stage by stage: ``torch`` files are memory-mapped and merged
    across TP one stage at a time; ``torch_dist`` is loaded into a TP=1 model (the whole model in memory).
    Nothing is unpickled beyond tensors and Megatron's own types without ``allow_pickle`` (torch_dist needs it)."""
    if fmt == "torch_dist":
        require_pickle_opt_in(path, allow_pickle)
        with single_rank_model(args, DTYPES[run_dtype(args)]) as model:
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


def hf_tensors(megatron: Iterator[tuple[str, torch.Tensor]], shape: LlamaShape) -> Iterator[tuple[str, torch.Tensor]]:
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
