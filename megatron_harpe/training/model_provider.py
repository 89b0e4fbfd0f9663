"""Build the model Megatron-LM's flags describe: ``HarpeGPTModel`` with ``--harpe-*``, megatron's ``GPTModel`` without.

``model_provider`` has the signature ``megatron.training.pretrain`` calls; :func:`build_model` is the same with
``args`` passed in, for the compact engine, conversion and evaluation.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.arguments import harpe_bases_from_args
from megatron_harpe.model import HarpeGPTModel, harpe_layer_spec, resolve_impl, standard_layer_spec

logger = logging.getLogger(__name__)


def layer_impl(args: argparse.Namespace) -> str:
    """``te`` for ``--transformer-impl transformer_engine`` where TE is installed, ``local`` otherwise."""
    if args.transformer_impl == "local":
        return "local"
    impl = resolve_impl("auto")
    if impl == "local":
        logger.info("Transformer Engine is not installed: building the local layer spec")
    return impl


def build_model(args: argparse.Namespace, pre_process: bool = True, post_process: bool = True, *,
                vp_stage: Optional[int] = None, config: Optional[TransformerConfig] = None, pg_collection=None):
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    impl = layer_impl(args)
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
    bases = harpe_bases_from_args(args)
    if bases is None:
        return GPTModel(config, standard_layer_spec(impl, normalization=args.normalization, qk_layernorm=args.qk_layernorm), **common,
                        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor)
    return HarpeGPTModel(config, harpe_layer_spec(impl, normalization=args.normalization, qk_layernorm=args.qk_layernorm), **common,
                         harpe_bases=bases, harpe_rope_impl=args.harpe_rope_impl)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config: Optional[TransformerConfig] = None, pg_collection=None):
    """``megatron.training.pretrain``'s model provider."""
    from megatron.training import get_args

    return build_model(get_args(), pre_process, post_process, vp_stage=vp_stage, config=config,
                       pg_collection=pg_collection)
