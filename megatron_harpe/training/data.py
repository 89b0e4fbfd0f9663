"""Datasets and batches exactly as Megatron-LM's ``pretrain_gpt.py`` (core_r0.19) makes them, for both engines.

Indexed datasets (``--data-path`` / ``--train-data-path`` ...) or ``--mock-data`` through megatron-core's
``BlendedMegatronDatasetBuilder`` with every dataset flag ``pretrain_gpt.py`` passes; each micro-batch is read
on tensor-parallel rank 0, reduced to megatron's batch keys, broadcast over the TP group, flattened for packed
sequences (``--dataloader-inter-document-masking``) and sliced for this context-parallel rank, all by
megatron-core's own helpers. Flags ``pretrain_gpt.py`` serves with another dataset or model path (SFT, FIM,
hybrid context parallelism, multi-token prediction, cached-logit distillation) are refused up front, by the parse
(:func:`megatron_harpe.megatron_args.unsupported_data_flags`).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import flatten_batch_for_packed_sequences, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank

# pretrain_gpt.py's BATCH_KEYS: what a micro-batch holds after get_batch. Anything else a dataset adds
# (BlendedDataset's 1-D "dataset_id") is dropped before the TP broadcast, or the CP slice fails on it.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask",
              "cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")
PACKED_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def gpt_dataset_config_from_args(args: argparse.Namespace, tokenizer) -> GPTDatasetConfig:
    """``pretrain_gpt.py``'s ``core_gpt_dataset_config_from_args``, field for field."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        sequences_per_dataset=sequences_per_dataset,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
        hybrid_context_parallel=args.hybrid_context_parallel,
        inter_document_masking=args.dataloader_inter_document_masking,
    )


def _stages(vp_stage: int | None) -> tuple[bool, bool]:
    ignore_virtual = vp_stage is None
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage))


def _is_dataset_built_on_rank(vp_stage: int | None = None, packed: bool = False) -> bool:
    # Stages that read tokens or labels need data, and with packed sequences every stage needs cu_seqlens
    # (pretrain_gpt.py's is_packed_sequence); TP ranks > 0 receive it by broadcast.
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return packed or any(_stages(vp_stage))


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: int | None = None):
    """``megatron.training.pretrain``'s dataset provider (also used by the compact engine)."""
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    config = gpt_dataset_config_from_args(args, get_tokenizer())
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    built_here = partial(_is_dataset_built_on_rank, vp_stage=vp_stage, packed=args.dataloader_inter_document_masking)
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, built_here, config).build()


train_valid_test_datasets_provider.is_distributed = True


def get_batch(data_iterator, args: argparse.Namespace, vp_stage: int | None = None) -> dict:
    """This rank's micro-batch as ``pretrain_gpt.py``'s ``get_batch``: a dict over :data:`BATCH_KEYS`."""
    first, last = _stages(vp_stage)
    packed = args.dataloader_inter_document_masking
    if not (first or last or packed):
        return dict.fromkeys(BATCH_KEYS)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        sample = next(data_iterator)
        batch = {k: sample[k].to(device, non_blocking=True) if sample.get(k) is not None else None
                 for k in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=packed,
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
        is_pipeline_first_stage=parallel_state.is_pipeline_first_stage(),
        is_pipeline_last_stage=parallel_state.is_pipeline_last_stage(),
    )
    batch = flatten_batch_for_packed_sequences(batch)
    if not (first or last):  # an intermediate stage of a packed run: only the sequence boundaries
        return {k: batch.get(k) if k in PACKED_KEYS else None for k in BATCH_KEYS}
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group(),
                                     use_per_sequence_balancing=packed)


def packed_seq_params_from_batch(batch: dict, seq_length: int) -> PackedSeqParams | None:
    """``pretrain_gpt.py``'s THD parameters for a batch with ``cu_seqlens`` (``None`` otherwise)."""
    if batch.get("cu_seqlens") is None:
        return None
    cu_seqlens = batch["cu_seqlens"].squeeze(0)  # the batch keeps (1, N); TE and PackedSeqParams take 1-D
    padded = batch["cu_seqlens_padded"].squeeze(0) if batch.get("cu_seqlens_padded") is not None else None
    boundaries = padded if padded is not None else cu_seqlens
    max_seqlen = int(batch["max_seqlen"].item())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=boundaries, cu_seqlens_kv=boundaries,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, tokens_per_sample=seq_length)
