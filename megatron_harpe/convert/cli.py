"""The commands behind tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py and tools/reshard_megatron.py.

torch, megatron and transformers are imported inside the command bodies, after ``parse_args``: ``--help`` and a
refused command line stay fast. Before any work each command refuses an ``--out`` that is, lies inside or holds an
input, and an existing ``--out`` that ``--force`` may not replace (:mod:`megatron_harpe.outputs`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from megatron_harpe.arguments import add_harpe_base_arguments, refuse_unused_search_flags, resolve_harpe_bases
from megatron_harpe.command import run_command
from megatron_harpe.outputs import atomic_output_dir, check_output_dir, refuse_overlap
from megatron_harpe.warning_filters import filter_unactionable_warnings

log = logging.getLogger(__name__)
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # hf_checkpoint.DTYPES' keys, without importing torch for --help
ALLOW_PICKLE_HELP = ("load checkpoint files that need full unpickling (runs any code they carry): torch-format "
                     "files holding more than tensors and Megatron's own types, and every torch_dist checkpoint, "
                     "whose .metadata torch unpickles; only for checkpoints you trust")


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=1.0)


def _check_out(out: str, force: bool, inputs: dict[str, str | None]) -> None:
    refuse_overlap(out, inputs)
    check_output_dir(out, force)


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 1 MiB. glibc raises it after the first large frees, and later tensors (tens of
    MiB: TP halves, contiguous copies) then come from thread heaps that keep freed pages: HF -> torch's peak grew
    ~20 MiB per 7B layer (benchmarks/README.md), flat with the threshold fixed."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator, its behaviour
        pass


def _run(body: Callable[[], None]) -> int:
    """A conversion's status: its own errors carry theirs (megatron_harpe.command); Megatron's argument errors are
    ValueErrors (2), a missing or unreadable path an OSError (1)."""
    filter_unactionable_warnings()  # the console scripts too, not only tools/*.py
    _return_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    return run_command(body, usage=(ValueError,), failures=(FileNotFoundError, PermissionError))


def hf_to_megatron(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Hugging Face Llama-2 -> Megatron-LM checkpoint (any TP/PP, HARPE bases).",
                                allow_abbrev=False)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True, help="a new directory (the checkpoint root, --load / --pretrained-checkpoint)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--format", choices=["torch_dist", "torch"], default="torch_dist",
                   help="torch_dist (Megatron's default) loads at any TP/PP; torch loads at this TP/PP only (train "
                        "with --auto-detect-ckpt-format to continue in torch_dist). Both are written one tensor at a "
                        "time, each Hugging Face tensor read once")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the checkpoint's torch_dtype (else bf16)")
    p.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                   help="the layer spec the torch format's key names follow (torch_dist fits both)")
    p.add_argument("--seq-length", type=int, help="training sequence length saved in the args (default: the "
                                                  "config's max_position_embeddings)")
    add_harpe_base_arguments(p, search_defaults=False,
                             neither="the bases of an exported HARPE model's config.json, else standard RoPE")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model*.bin (unpickling runs code)")
    p.add_argument("--force", action="store_true", help="replace an --out this command wrote before")
    args = p.parse_args(argv)

    def body():
        refuse_unused_search_flags(args)  # before any work
        from megatron_harpe.convert.hf_checkpoint import DTYPES, HFCheckpoint
        from megatron_harpe.convert.mapping import GLOBAL_TABLE, LAYER_TABLE
        from megatron_harpe.convert.megatron_checkpoint import megatron_args
        from megatron_harpe.convert.torch_dist_format import write_torch_dist
        from megatron_harpe.convert.torch_format import write_torch
        from megatron_harpe.convert.rope_scaling import describe

        _check_out(args.out, args.force, {"--hf-dir": args.hf_dir})
        hf = HFCheckpoint(args.hf_dir, allow_pickle=args.allow_pickle)
        hf.shape.check_layout(args.tp, args.pp)
        dtype = args.dtype or hf.dtype
        seq_length = args.seq_length or hf.shape.max_position_embeddings
        bases = resolve_harpe_bases(args, hf.shape.num_query_groups, hf.shape.head_dim, seq_length,
                                    search_defaults=False)
        if bases is None and hf.harpe_bases:  # an exported HARPE model keeps its bases
            bases = [float(b) for b in hf.harpe_bases]
        margs = megatron_args(hf.shape, tp=args.tp, pp=args.pp, dtype=dtype, ckpt_format=args.format,
                              transformer_impl=args.transformer_impl, seq_length=seq_length, harpe_bases=bases)
        with atomic_output_dir(args.out, force=args.force, tool="convert_hf_to_megatron",
                               inputs={"--hf-dir": args.hf_dir}) as tmp:
            if args.format == "torch":  # progress: one step a global tensor or a layer
                with _progress(len(GLOBAL_TABLE) + hf.shape.num_layers, "converting") as bar:
                    write_torch(tmp, hf.read, hf.shape, margs, DTYPES[dtype], bar.update)
            else:  # one step a megatron parameter
                with _progress(len(GLOBAL_TABLE) + hf.shape.num_layers * len(LAYER_TABLE), "converting") as bar:
                    write_torch_dist(tmp, hf.read, hf.shape, margs, DTYPES[dtype], bar.update)
        print(f"wrote {args.out} ({args.format}, TP={args.tp} PP={args.pp}, {dtype}, padded vocab "
              f"{margs.padded_vocab_size}" + (f", {len(bases)} HARPE bases" if bases else ", standard RoPE")
              + describe(hf.shape.rope_scaling) + ")")

    return _run(body)


def megatron_to_hf(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Megatron-LM checkpoint (any TP/PP, torch or torch_dist) -> Hugging Face.",
                                allow_abbrev=False)
    p.add_argument("--megatron-dir", required=True, help="the checkpoint root (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--iteration", type=int, help="default: the latest")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the run's (bf16/fp16), else fp32")
    p.add_argument("--tokenizer-model", help="sentencepiece tokenizer.model: Hugging Face tokenizer files, and the "
                                             "special token ids of config.json (default: Llama-2's bos 1, eos 2)")
    p.add_argument("--vocab-size", type=int, help="true vocabulary size, when the checkpoint's args lack it")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--force", action="store_true", help="replace an --out this command wrote before")
    args = p.parse_args(argv)

    def body():
        from megatron_harpe.arguments import harpe_bases_from_args
        from megatron_harpe.checkpoint_layout import read_checkpoint
        from megatron_harpe.convert.hf_checkpoint import (
            DTYPES,
            HFWriter,
            hf_tensor_shape,
            required_hf_names,
            tokenizer_special_ids,
            tokenizer_vocab_size,
            write_hf_config,
            write_hf_tokenizer,
        )
        from megatron_harpe.convert.mapping import ConversionError
        from megatron_harpe.convert.megatron_checkpoint import (
            checkpoint_shape,
            hf_tensors,
            megatron_full_tensors,
            run_dtype,
        )
        from megatron_harpe.convert.rope_scaling import describe, refuse_with_harpe
        from megatron_harpe.shape import ShapeError

        inputs = {"--megatron-dir": args.megatron_dir, "--tokenizer-model": args.tokenizer_model}
        _check_out(args.out, args.force, inputs)
        vocab = args.vocab_size
        if args.tokenizer_model:
            tokenizer_vocab = tokenizer_vocab_size(args.tokenizer_model)
            if vocab is not None and vocab != tokenizer_vocab:
                raise ConversionError(f"--vocab-size {vocab} but --tokenizer-model has {tokenizer_vocab} pieces: "
                                      "give one of them, or the tokenizer the model was trained with")
            vocab = tokenizer_vocab
        path, fmt, margs = read_checkpoint(args.megatron_dir, args.iteration, allow_pickle=args.allow_pickle)
        shape = checkpoint_shape(margs, vocab, vocab_flags="--vocab-size or --tokenizer-model")
        bases = harpe_bases_from_args(margs)
        try:
            refuse_with_harpe(shape.rope_scaling, bases)
        except ShapeError as e:  # a checkpoint the export cannot write: a failed run, as checkpoint_shape's
            raise ConversionError(str(e)) from None
        dtype = args.dtype or run_dtype(margs)
        special = tokenizer_special_ids(args.tokenizer_model) if args.tokenizer_model else None
        with atomic_output_dir(args.out, force=args.force, tool="convert_megatron_to_hf", inputs=inputs) as tmp:
            names = required_hf_names(shape)
            with (HFWriter(tmp, [(n, hf_tensor_shape(n, shape)) for n in names], DTYPES[dtype],
                           int(args.max_shard_gb * 2**30)) as writer,
                  _progress(len(names), "exporting") as bar):
                for name, tensor in hf_tensors(megatron_full_tensors(path, fmt, margs, args.allow_pickle), shape):
                    writer.add(name, tensor.to(DTYPES[dtype]))
                    bar.update(1)
                writer.finish()
            if args.tokenizer_model:  # before config.json: transformers would ask to trust a HARPE config's code
                write_hf_tokenizer(tmp, args.tokenizer_model)
            write_hf_config(tmp, shape, dtype, bases, special)
        kind = f"HARPE Llama with {len(bases)} bases (trust_remote_code=True)" if bases else "LlamaForCausalLM"
        print(f"wrote {args.out}: {kind}{describe(shape.rope_scaling)}, {dtype}, from {path} ({fmt})")

    return _run(body)


def reshard(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Megatron-LM checkpoint (TP a, PP b) -> torch format at (TP c, PP d).",
                                allow_abbrev=False)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--iteration", type=int)
    p.add_argument("--vocab-size", type=int, help="true vocabulary size, when the checkpoint's args lack it")
    p.add_argument("--transformer-impl", choices=["transformer_engine", "local"])
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--force", action="store_true", help="replace an --out this command wrote before")
    args = p.parse_args(argv)

    def body():
        from megatron_harpe.checkpoint_layout import read_checkpoint
        from megatron_harpe.convert.hf_checkpoint import DTYPES
        from megatron_harpe.convert.megatron_checkpoint import (
            checkpoint_shape,
            hf_tensors,
            megatron_full_tensors,
            run_dtype,
        )
        from megatron_harpe.convert.torch_format import write_torch

        _check_out(args.out, args.force, {"--megatron-dir": args.megatron_dir})
        path, fmt, margs = read_checkpoint(args.megatron_dir, args.iteration, allow_pickle=args.allow_pickle)
        shape = checkpoint_shape(margs, args.vocab_size, vocab_flags="--vocab-size")
        shape.check_layout(args.tp, args.pp)
        # Through the same table: megatron (any layout) -> Hugging Face names -> megatron at the new layout.
        hf = dict(hf_tensors(megatron_full_tensors(path, fmt, margs, args.allow_pickle), shape))
        new = argparse.Namespace(**vars(margs))
        new.tensor_model_parallel_size, new.pipeline_model_parallel_size, new.ckpt_format = args.tp, args.pp, "torch"
        new.transformer_impl = args.transformer_impl or margs.transformer_impl
        new.padded_vocab_size = shape.padded_vocab_size(args.tp, margs.make_vocab_size_divisible_by)
        new.vocab_size = shape.vocab_size
        with atomic_output_dir(args.out, force=args.force, tool="reshard_megatron",
                               inputs={"--megatron-dir": args.megatron_dir}) as tmp:
            write_torch(tmp, hf.__getitem__, shape, new, DTYPES[run_dtype(margs)])
        print(f"wrote {args.out} (torch, TP={args.tp} PP={args.pp}) from {path} ({fmt})")

    return _run(body)
