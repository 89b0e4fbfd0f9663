"""Batches and dataset config as Megatron-LM's ``pretrain_gpt.py`` (core_r0.19) makes them, on the CPU.

The batch keeps megatron's keys only (a blend's ``dataset_id`` would break the CP slice: the CP=2 run on a
weighted blend is in test_compact.py); every dataset flag ``pretrain_gpt.py`` passes reaches ``GPTDatasetConfig``;
``--dataloader-inter-document-masking`` batches become megatron's THD parameters, and a HARPE model fed them
equals each document run on its own (positions restart per document).
"""

import argparse
import json

import pytest
import torch

from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.megatron_args import unsupported_data_flags
from megatron_harpe.training.data import BATCH_KEYS, get_batch, gpt_dataset_config_from_args, packed_seq_params_from_batch
from utils import TINY_ARGV as TINY, VOCAB, tiny_model



def parse(argv):
    from megatron_harpe.megatron_args import parse_megatron_args

    return parse_megatron_args(argv)


def batch_args(**overrides):
    fields = dict(dataloader_inter_document_masking=False, create_attention_mask_in_dataloader=False,
                  context_parallel_size=1, micro_batch_size=2, seq_length=64, pipeline_model_parallel_size=1)
    fields.update(overrides)
    return argparse.Namespace(**fields)


def test_batch_holds_megatrons_keys_only(megatron_single_process):
    s = 64
    sample = dict(tokens=torch.arange(2 * s).view(2, s), labels=torch.arange(2 * s).view(2, s) + 1,
                  loss_mask=torch.ones(2, s), position_ids=torch.arange(s).repeat(2, 1),
                  dataset_id=torch.tensor([0, 1]))  # what BlendedDataset adds to every sample
    batch = get_batch(iter([sample]), batch_args())
    assert set(batch) == set(BATCH_KEYS) and "dataset_id" not in batch
    assert torch.equal(batch["tokens"], sample["tokens"]) and torch.equal(batch["labels"], sample["labels"])
    assert batch["attention_mask"] is None and batch["cu_seqlens"] is None


def test_every_dataset_flag_reaches_the_config(tmp_path):
    sequences = tmp_path / "sequences.json"
    sequences.write_text(json.dumps({"prefix": 10}))
    args = parse(TINY + ["--full-validation", "--multiple-validation-sets", "--allow-ambiguous-pad-tokens",
                         "--data-cache-path", str(tmp_path / "cache"), "--dataloader-fast-cache-load",
                         "--dataloader-defer-npy-index-mmap", "--object-storage-cache-path", str(tmp_path / "os"),
                         "--per-dataset-sequences-path", str(sequences), "--dataloader-inter-document-masking",
                         "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss", "--seed", "7"])
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    config = gpt_dataset_config_from_args(args, build_tokenizer(args))
    # pretrain_gpt.py core_r0.19 core_gpt_dataset_config_from_args, restated field by field
    expected = dict(random_seed=7, sequence_length=64, multiple_validation_sets=True,
                    full_validation=True, path_to_cache=str(tmp_path / "cache"), allow_ambiguous_pad_tokens=True,
                    fast_cache_load=True, defer_npy_index_mmap=True, object_storage_cache_path=str(tmp_path / "os"),
                    sequences_per_dataset={"prefix": 10}, reset_position_ids=True, reset_attention_mask=True,
                    eod_mask_loss=True, create_attention_mask=False, inter_document_masking=True,
                    context_parallel_size=1, data_parallel_size=1, sequence_parallel_size=0,
                    hybrid_context_parallel=False, mid_level_dataset_surplus=args.mid_level_dataset_surplus,
                    num_dataset_builder_threads=args.num_dataset_builder_threads, mmap_bin_files=True)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("flags, refused", [
    (["--sft"], "--sft"),
    (["--fim-data", "--data-path", "unused"], "--fim-data"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers"),
    (["--dataloader-inter-document-masking", "--context-parallel-size", "2"], "--dataloader-inter-document-masking"),
])
def test_flags_without_a_path_here_are_refused(flags, refused, monkeypatch):
    from megatron_harpe.arguments import HarpeArgumentError

    monkeypatch.setenv("WORLD_SIZE", "2")  # room for CP 2
    argv = [a for a in TINY if a != "--mock-data"] if "--data-path" in flags else TINY
    with pytest.raises(HarpeArgumentError, match=refused):
        parse(argv + flags)


def test_the_refusal_list_is_empty_for_a_plain_run():
    assert unsupported_data_flags(parse(TINY)) == []


def _documents_sample(lengths_per_row, s):
    """What GPTDataset(inter_document_masking=True) gives, collated: padded cu_seqlens rows and max_seqlen."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (len(lengths_per_row), s), generator=g)
    cu = torch.full((len(lengths_per_row), s + 1), s, dtype=torch.int32)
    for row, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == s
        cu[row, : len(lengths) + 1] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    max_seqlen = torch.tensor([max(lengths) for lengths in lengths_per_row], dtype=torch.int32)
    return dict(tokens=tokens, labels=tokens, loss_mask=torch.ones(tokens.shape), cu_seqlens=cu,
                max_seqlen=max_seqlen, position_ids=torch.zeros_like(tokens))


@pytest.mark.parametrize("rope_impl", ["torch", "unfused"])
def test_inter_document_masking_equals_documents_run_separately(megatron_single_process, rope_impl):
    s, rows = 64, [[20, 30, 14], [5, 59]]
    sample = _documents_sample(rows, s)
    with megatron_on_cpu():  # megatron's TP broadcast helper allocates on the current CUDA device
        batch = get_batch(iter([sample]), batch_args(dataloader_inter_document_masking=True))
    params = packed_seq_params_from_batch(batch, s)
    # flattened to one packed row; one boundary list over both samples (megatron's flatten helper)
    assert batch["tokens"].shape == (1, 2 * s) and params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 20, 50, 64, 69, 128] and params.max_seqlen_q == 59
    model = tiny_model(harpe_rope_impl=rope_impl).eval()
    with torch.no_grad():
        packed = model(batch["tokens"], None, None, packed_seq_params=params)
        bounds = params.cu_seqlens_q.tolist()
        flat = batch["tokens"][0]
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = model(flat[start:end][None], None, None)
            torch.testing.assert_close(packed[:, start:end], alone, atol=1e-5, rtol=1e-5)


def test_reset_attention_mask_equals_documents_run_separately(megatron_single_process):
    """--reset-position-ids --reset-attention-mask (a dense mask): RoPE is relative, so documents are independent."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    s, eod = 48, 0
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (s,), generator=g)
    ids[[15, 31]] = eod  # three documents: [0, 15], [16, 31], [32, 47]
    mask, _, position_ids = _get_ltor_masks_and_position_ids(ids, eod, True, True, False, True)
    model = tiny_model(harpe_rope_impl="torch").eval()
    with torch.no_grad():
        masked = model(ids[None], position_ids[None], mask[None])
        for start, end in ((0, 16), (16, 32), (32, 48)):
            alone = model(ids[None, start:end], None, None)
            torch.testing.assert_close(masked[:, start:end], alone, atol=1e-5, rtol=1e-5)
