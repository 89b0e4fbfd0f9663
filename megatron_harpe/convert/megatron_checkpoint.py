"""Megatron-LM checkpoints for a Llama: the args megatron.training expects, and full tensors read from either format
(``torch``: :mod:`megatron_harpe.convert.torch_format`; ``torch_dist``: :mod:`megatron_harpe.convert.torch_dist_format`).
Converted checkpoints are ``release`` checkpoints: train from them with ``--finetune --no-load-optim --no-load-rng``
(``--pretrained-checkpoint`` in examples/). Where the files go: :mod:`megatron_harpe.checkpoint_layout`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from megatron_harpe.convert.hf_checkpoint import DTYPES
from megatron_harpe.convert.mapping import ConversionError, hf_source, to_hf
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


# --- reading ---------------------------------------------------------------------------------------------------

def megatron_full_tensors(path: str, fmt: str, args: argparse.Namespace,
                          allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)`` of either format. Nothing is unpickled beyond tensors and
    Megatron's own types without ``allow_pickle`` (torch_dist needs it)."""
    if fmt == "torch_dist":
        from megatron_harpe.convert.torch_dist_format import read_torch_dist

        return read_torch_dist(path, args, DTYPES[run_dtype(args)], allow_pickle)
    from megatron_harpe.convert.torch_format import read_torch

    return read_torch(path, args, allow_pickle)


def hf_tensors(megatron: Iterator[tuple[str, torch.Tensor]], shape: LlamaShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face ``(name, tensor)`` from full megatron tensors (any order)."""
    for name, tensor in megatron:
        hf_names, combination = hf_source(name)
        yield from zip(hf_names, to_hf(combination, tensor, shape))
