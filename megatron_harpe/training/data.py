"""Datasets and batches the way Megatron-LM's ``pretrain_gpt.py`` makes them, for both engines.

Indexed datasets (``--data-path`` / ``--train-data-path`` ...) or ``--mock-data`` through megatron-core's
``BlendedMegatronDatasetBuilder``; each micro-batch is read on tensor-parallel rank 0, broadcast over the TP
group and sliced for this context-parallel rank by megatron-core's own helpers.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank


def gpt_dataset_config_from_args(args: argparse.Namespace, tokenizer) -> GPTDatasetConfig:
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def _is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    # Only the stages that read tokens or labels need data; TP ranks > 0 receive it by broadcast.
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    return (first or last) and parallel_state.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """``megatron.training.pretrain``'s dataset provider (also used by the compact engine)."""
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    config = gpt_dataset_config_from_args(args, get_tokenizer())
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(_is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()


train_valid_test_datasets_provider.is_distributed = True


def get_batch(data_iterator, args: argparse.Namespace, vp_stage: Optional[int] = None) -> dict:
    """This rank's micro-batch: tokens, labels, loss_mask, position_ids, attention_mask (or ``None``)."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if not (first or last):
        return dict(tokens=None, labels=None, loss_mask=None, position_ids=None, attention_mask=None)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in next(data_iterator).items()}
        if not args.create_attention_mask_in_dataloader:
            batch["attention_mask"] = None
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        broadcast_group=parallel_state.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )
    batch.setdefault("attention_mask", None)
    batch["cu_seqlens"] = None
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())
