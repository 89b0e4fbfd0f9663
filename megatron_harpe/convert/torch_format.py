"""Megatron-LM's legacy ``torch`` checkpoint format: one ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tensor,
pipeline) rank, loadable at the layout it was saved with. Where the files go: :mod:`megatron_harpe.checkpoint_layout`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from megatron_harpe.checkpoint_layout import load_torch_file, rank_file, torch_rank_files, write_release_tracker
from megatron_harpe.convert.mapping import (
    EXTRA_STATE_MODULES,
    GLOBAL_TABLE,
    LAYER_TABLE,
    hf_layer_name,
    megatron_layer_name,
    merge_tp,
    parse_layer_key,
    split_tp,
    stage_has,
    stage_layers,
    to_megatron,
)
from megatron_harpe.shape import LlamaShape


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




def read_torch(path: str, args: argparse.Namespace,
               allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)`` stage by stage, the rank files memory-mapped and merged across TP."""
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
