"""``megatron.training.pretrain``'s model provider: :func:`megatron_harpe.model_from_args.build_model` on megatron's
global args."""

from __future__ import annotations


from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.model_from_args import build_model


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: TransformerConfig | None = None, pg_collection=None):
    """``megatron.training.pretrain``'s model provider."""
    from megatron.training import get_args

    return build_model(get_args(), pre_process, post_process, vp_stage=vp_stage, config=config,
                       pg_collection=pg_collection)
