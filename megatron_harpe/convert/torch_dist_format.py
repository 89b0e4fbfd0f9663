"""Megatron-core's ``torch_dist`` checkpoint format (``dist_checkpointing``): layout-free, any TP/PP loads it.

Both directions stream through a TP=1 model whose parameters live on the ``meta`` device
(:func:`megatron_harpe.checkpoint_model.meta_model`): its ``sharded_state_dict()`` is megatron's exact layout (keys,
stacked layer axis, SwiGLU factory, ``_extra_state`` objects) at no memory cost.

Writing is megatron's own save path (``save_preprocess``, the ``common_state`` object, the translation to a
torch.distributed.checkpoint state dict) and one ``torch.distributed.checkpoint.save``, whose planner makes each
chunk from the Hugging Face tensors only when torch's ``FileSystemWriter`` asks for it (``_SerialCpuLoader``
resolves items one at a time, between file writes). Reading gives one unit (embedding, each layer, final norm,
output layer) CPU storage at a time and loads just its chunks with ``dist_checkpointing.load``.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable, Iterator

import torch

from megatron_harpe.checkpoint_layout import load_torch_dist, release_dir, write_release_tracker
from megatron_harpe.checkpoint_model import meta_model
from megatron_harpe.convert.file_io import open_capped_writer
from megatron_harpe.convert.mapping import hf_source, to_megatron
from megatron_harpe.convert.torch_format import without_crc32
from megatron_harpe.shape import LlamaShape

# torch's FileSystemWriter threads (one file each, one chunk in the making each). 2 wrote no faster than 1 on a
# 1.33 GB bf16 model (CPU-bound on 2 cores); CRC32 off wrote 1.6-2x faster (issue 18, session 11 measurements).
WRITER_THREADS = 1


# --- writing ----------------------------------------------------------------------------------------------------

def write_torch_dist(root: str, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, args: argparse.Namespace,
                     dtype: torch.dtype, progress: Callable[[int], None] = lambda n: None) -> None:
    """A layout-free ``torch_dist`` checkpoint, each chunk made just before it is written (torch's writer keeps
    the last chunk of each key until its file closes: one layer and the global tensors at most); ``progress(1)``
    per parameter (``len(GLOBAL_TABLE) + num_layers * len(LAYER_TABLE)`` in all)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (_replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)

    path = release_dir(root)
    os.makedirs(path, exist_ok=True)
    with meta_model(args, dtype) as model:
        model_sd = model.sharded_state_dict()
        source = _ChunkSource(_chunk_names(model_sd), read_hf, shape, args.padded_vocab_size, dtype, progress)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model_sd}
        # dist_checkpointing.save (serialization.py) up to its strategy ...
        sharded, common = save_preprocess(state, validate_access_integrity=True)
        sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                                global_offset=(0,), replica_id=0)
        # ... and TorchDistSaveShardedStrategy.async_save (strategies/torch.py) up to its writer
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
        # per_thread_copy_ahead=0: torch's serial loader also where CUDA is present (its overlapping one is for
        # device-to-host copies, and would make several chunks ahead of the file write)
        writer = dcp.FileSystemWriter(path, thread_count=WRITER_THREADS, single_file_per_rank=True,
                                      per_thread_copy_ahead=0)
        writer.fs = _capped_file_system()
        with without_crc32():  # DCP stores each chunk with torch.save
            dcp.save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer, planner=_lazy_planner(source))
        save_config(CheckpointingConfig("torch_dist", 1), path)  # metadata.json: last, as megatron's finalize
    write_release_tracker(root)


def _chunk_names(sharded_state_dict: dict) -> dict[tuple[str, tuple[int, ...]], tuple[str, int]]:
    """``(sharded key, global offset) -> (state-dict name, prepended axes)`` for every ShardedTensor, factories
    built as save_preprocess will; at TP=1 a chunk's offset past the layer axis is its offset in the parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    names = {}
    for name, value in sharded_state_dict.items():
        built = nested_values(value.build()) if isinstance(value, ShardedTensorFactory) else [value]
        for sh in built:
            if isinstance(sh, ShardedTensor):
                names[sh.key, tuple(sh.global_offset)] = (name, sh.prepend_axis_num)
    return names


class _ChunkSource:
    """A chunk of a TP=1 megatron parameter, made from the Hugging Face tensors when asked for; nothing cached, so
    concurrent writer threads hold one parameter each. A SwiGLU fc1 half is its one Hugging Face tensor."""

    def __init__(self, chunk_names, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, padded_vocab: int,
                 dtype: torch.dtype, progress: Callable[[int], None]):
        self.chunk_names, self.read_hf, self.shape, self.padded_vocab, self.dtype = (
            chunk_names, read_hf, shape, padded_vocab, dtype)
        self.chunks_left: dict[str, int] = {}
        for name, _ in chunk_names.values():
            self.chunks_left[name] = self.chunks_left.get(name, 0) + 1
        self.progress, self.lock = progress, threading.Lock()

    def __call__(self, fqn: str, offsets, sizes, stored_dtype: torch.dtype) -> torch.Tensor:
        name, prepend = self.chunk_names[fqn, tuple(offsets)]
        offsets, local_sizes = offsets[prepend:], sizes[prepend:]
        hf_names, combination = hf_source(name)
        if combination == "gate_up" and local_sizes[0] == self.shape.ffn_hidden_size:
            hf_names, combination = [hf_names[offsets[0] // local_sizes[0]]], "same"  # [gate; up]: one of them
            offsets = (0, *offsets[1:])
        tensor = to_megatron(combination, [self.read_hf(n) for n in hf_names], self.shape, self.padded_vocab)
        tensor = tensor.to(self.dtype).to(stored_dtype)  # rounded to the run's dtype, kept in the model's
        for dim, (start, size) in enumerate(zip(offsets, local_sizes)):
            tensor = tensor.narrow(dim, start, size)
        with self.lock:
            self.chunks_left[name] -= 1
            if not self.chunks_left[name]:
                self.progress(1)
        # A view of a larger storage: torch's loader clones it to the chunk's own (filesystem.py _SerialCpuLoader).
        return tensor.reshape(sizes)


def _capped_file_system():
    """torch's FileSystem, its write streams making system calls of at most file_io.WRITE_CHUNK bytes (torch.save
    writes each chunk's storage in one call)."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint.filesystem import FileSystem

    class CappedWritesFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with open_capped_writer(path) as stream:
                yield stream

    return CappedWritesFileSystem()


def _lazy_planner(source: _ChunkSource):
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's planner, planning from the meta state dict; a tensor's data made when the writer asks."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:  # ShardedObjects (common_state, _extra_state): small
                return super().resolve_data(write_item)
            data = write_item.tensor_data  # the model's dtype: megatron's torch norms stay fp32 in a bf16 model
            return source(write_item.index.fqn, write_item.index.offset, data.chunk.sizes, data.properties.dtype)

    return LazySavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)


# --- reading ----------------------------------------------------------------------------------------------------

def read_torch_dist(path: str, args: argparse.Namespace, dtype: torch.dtype,
                    allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)``, one unit (embedding, each layer, final norm, output layer) at a
    time: only that unit has storage."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    strategy = TorchDistLoadShardedStrategy(cache_metadata=True)  # .metadata unpickled once, not once per unit
    with meta_model(args, dtype) as model:
        for unit in units(model):
            unit.to_empty(device="cpu")
            wanted = {name: value for name, value in model.sharded_state_dict().items()
                      if not isinstance(value, ShardedObject) and _on_cpu(value)}
            apply_factories(wanted)  # SwiGLU fc1: two chunk views of the parameter, loaded in place
            wanted = dict_list_map_inplace(_without_prepended_axes, wanted)
            # Access integrity wants every chunk of every key loaded by some rank: one unit's are not.
            load_torch_dist(wanted, path, allow_pickle, sharded_strategy=strategy, validate_access_integrity=False)
            del wanted
            for name, tensor in model.state_dict().items():  # loaded in place, into the unit's parameters
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                    yield name, tensor
            unit.to_empty(device="meta")  # what the caller kept of it stays theirs


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What the reader loads at once: the embedding, each layer, the final norm, the output layer."""
    return [model.embedding, *model.decoder.layers, model.decoder.final_layernorm, model.output_layer]


def _on_cpu(value) -> bool:
    data = getattr(value, "data", None)
    return isinstance(data, torch.Tensor) and data.device.type == "cpu"


def _without_prepended_axes(sh):
    """The same chunk with megatron's layer axis in its local shape (a ``(1, ...)`` view of the parameter).

    megatron sends ShardedTensors with ``prepend_axis_num`` through torch's legacy ShardedTensor
    (strategies/torch.py ``sharded_tensor_to_torch_sharded_tensor``), which in a world of one process counts the
    other layers' chunks as local (placement ``(rank + 1) % world_size``) and refuses a partial load; without
    prepended axes the chunk goes through ``CheckpointableShardedTensor``, which reads just it."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(sh, ShardedTensor) or not sh.prepend_axis_num:
        return sh
    local_shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return replace(sh, data=sh.data.view(local_shape), local_shape=local_shape, prepend_axis_num=0)
