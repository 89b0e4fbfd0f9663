"""Build the model Megatron-LM's flags describe: ``HarpeGPTModel`` with ``--harpe-*``, megatron's ``GPTModel`` without.

:func:`build_model` takes the parsed ``args``: ``training.model_provider`` (what ``megatron.training.pretrain``
calls), the compact engine, conversion and evaluation all build through it.
"""

from __future__ import annotations

import argparse

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.arguments import HarpeArgumentError, harpe_bases_from_args
from megatron_harpe.model import HarpeGPTModel, harpe_layer_spec, have_te, standard_layer_spec

# What build_model prints, once per process on rank 0: "layer spec: <name> (...)" and the RoPE path
# ("standard RoPE: ...", "HARPE RoPE path: ..."; HARPE's kernels print "HARPE RoPE kernel: <name>" at their first
# call). benchmarks/gpu_check_report.py matches these lines.
SPEC_NAMES = {"te": "transformer_engine (megatron's TE layer spec)",
              "local": "local (megatron's local layer spec with the torch-SDPA core attention)"}
_announced = False


def layer_impl(args: argparse.Namespace) -> str:
    """``te`` for ``--transformer-impl transformer_engine`` (Megatron's default), ``local`` for ``local``.

    Never a silent substitute: without Transformer Engine the TE spec is an error that says what to do, since
    the local spec's core attention is a reference path (an explicit mask costs s x s memory per layer).
    """
    if args.transformer_impl == "local":
        return "local"
    if args.transformer_impl != "transformer_engine":
        raise HarpeArgumentError(f"--transformer-impl {args.transformer_impl}: HARPE builds transformer_engine "
                                 "or local layer specs")
    if not have_te():
        raise HarpeArgumentError(
            "--transformer-impl transformer_engine (Megatron's default) needs Transformer Engine, which is not "
            "installed: run in NVIDIA's PyTorch container (docker/), or pass --transformer-impl local for "
            "megatron's local spec with the torch-SDPA core attention (a reference path: under context "
            "parallelism, packed sequences or an explicit mask it builds an s_local x s mask in every layer)")
    return "te"


def rope_path(args: argparse.Namespace, bases) -> str:
    """How q and k will be rotated, in the words build_model logs."""
    if bases is None:
        fused = getattr(args, "apply_rope_fusion", False) and torch.cuda.is_available()
        return f"standard RoPE: megatron's {'fused' if fused else 'unfused'} path, base {args.rotary_base:g}"
    if args.harpe_rope_impl == "unfused":  # megatron's own RoPE function applies it: no first-call line follows
        return "HARPE RoPE kernel: unfused (megatron's unfused RoPE, materialized per-head frequencies)"
    return (f"HARPE RoPE path: --harpe-rope-impl {args.harpe_rope_impl} (the kernel that runs prints "
            "'HARPE RoPE kernel: ...' at its first call)")


def _announce(impl: str, bases, args: argparse.Namespace) -> None:
    global _announced
    if _announced or getattr(args, "rank", 0) != 0:
        return
    _announced = True
    # print, as megatron.training reports: its logging set-up decides what a logger shows.
    print(f"layer spec: {SPEC_NAMES[impl]}", flush=True)
    print(rope_path(args, bases), flush=True)


def build_model(args: argparse.Namespace, pre_process: bool = True, post_process: bool = True, *,
                vp_stage: int | None = None, config: TransformerConfig | None = None, pg_collection=None):
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    impl = layer_impl(args)
    bases = harpe_bases_from_args(args)
    _announce(impl, bases, args)
    common = dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_percent=args.rotary_percent,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if bases is None:
        return GPTModel(config, standard_layer_spec(impl, normalization=args.normalization, qk_layernorm=args.qk_layernorm), **common,
                        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor)
    return HarpeGPTModel(config, harpe_layer_spec(impl, normalization=args.normalization, qk_layernorm=args.qk_layernorm), **common,
                         harpe_bases=bases, harpe_rope_impl=args.harpe_rope_impl)

