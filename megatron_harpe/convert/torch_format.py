"""Megatron-LM's legacy ``torch`` checkpoint format: one ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per (tensor,
pipeline) rank, loadable at the layout it was saved with. Where the files go: :mod:`megatron_harpe.checkpoint_layout`.

Both directions stream, in memory independent of the model's size, with torch's own serialization:

- writing, ``torch.save`` under ``torch.serialization.skip_data`` saves each rank's state dict with FakeTensors (the
  pickled structure and a hole of the right size per tensor, no bytes held); then every Hugging Face tensor is read
  once, its full megatron tensor built, split across TP ranks, and each rank's part ``pwrite``-n into its file at the
  offset ``torch.load(map_location="meta")`` reports for that storage;
- reading, the same meta load gives each tensor's dtype, size, stride and file offset: its bytes are read into a
  fresh tensor, merged across TP and yielded. Nothing stays memory-mapped (mapped pages would pile up, resident).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_harpe.checkpoint_layout import (
    CheckpointError,
    load_torch_file,
    rank_file,
    torch_rank_files,
    write_release_tracker,
)
from megatron_harpe.convert.file_io import pread_all, pwrite_all, tensor_bytes
from megatron_harpe.convert.hf_checkpoint import hf_tensor_shape
from megatron_harpe.convert.mapping import (
    EXTRA_STATE_MODULES,
    GLOBAL_TABLE,
    LAYER_TABLE,
    ConversionError,
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

# Rank files are written, and each tensor's bytes read in IO_CHUNK pieces, on IO_THREADS threads. Measured on 2
# cores, 2 threads against 1 (medians of 5, alternated): a 4-layer 7B-shaped model written at TP 2 1.4x faster, read
# back 1.26x; chunks of one file written side by side gain nothing (ext4 serializes writes to a file).
IO_THREADS = min(4, os.cpu_count() or 1)
IO_CHUNK = 16 * 2**20

# --- writing -----------------------------------------------------------------------------------------------------

def write_torch(root: str, read_hf: Callable[[str], torch.Tensor], shape: LlamaShape, args: argparse.Namespace,
                dtype: torch.dtype, progress: Callable[[int], None] = lambda n: None) -> None:
    """One ``model_optim_rng.pt`` per (TP, PP) rank; each Hugging Face tensor read once. ``progress(1)`` per global
    tensor and per layer (``len(GLOBAL_TABLE) + num_layers`` steps)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            files[tp_rank, pp_rank] = path = rank_file(root, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with without_crc32(), torch.serialization.skip_data(materialize_fake_tensors=True):
                torch.save(_rank_skeleton(shape, args, dtype, tp_rank, pp_rank), path)
    with _RankFiles(files) as out:
        for megatron, hf, combination, where in GLOBAL_TABLE:
            full = _full_tensor(read_hf, [hf], combination, shape, args, dtype)
            for pp_rank in range(pp):
                if stage_has(where, pp, pp_rank):
                    out.write(pp_rank, megatron, split_tp(megatron, full, tp))
            del full  # before the next read: one full tensor in memory at a time
            progress(1)
        for pp_rank in range(pp):
            for local, layer in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
                for megatron, hf_names, combination in LAYER_TABLE:
                    full = _full_tensor(read_hf, [hf_layer_name(layer, n) for n in hf_names], combination, shape,
                                        args, dtype)
                    out.write(pp_rank, megatron_layer_name(local, megatron, args.transformer_impl),
                              split_tp(megatron, full, tp))
                    del full
                progress(1)
    write_release_tracker(root)


def _rank_skeleton(shape: LlamaShape, args: argparse.Namespace, dtype: torch.dtype, tp_rank: int,
                   pp_rank: int) -> dict:
    """The state dict Megatron saves for one rank (its keys in Megatron's order, ``_extra_state`` None entries
    included), every tensor a FakeTensor of the rank's part: shapes from the mapping run on meta tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tp, pp, impl = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.transformer_impl
    fake_mode = FakeTensorMode()

    def part(megatron: str, hf_names: list[str], combination: str) -> torch.Tensor:
        hf = [torch.empty(hf_tensor_shape(name, shape), device="meta") for name in hf_names]
        meta = split_tp(megatron, to_megatron(combination, hf, shape, args.padded_vocab_size), tp)[tp_rank]
        with fake_mode:
            return torch.empty(meta.shape, dtype=dtype)

    state = {}
    for megatron, hf, combination, where in GLOBAL_TABLE:
        if stage_has(where, pp, pp_rank):
            state[megatron] = part(megatron, [hf], combination)
    if stage_has("last", pp, pp_rank):
        state["output_layer._extra_state"] = None
    for local, layer in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
        for megatron, hf_names, combination in LAYER_TABLE:
            state[megatron_layer_name(local, megatron, impl)] = part(
                megatron, [hf_layer_name(layer, n) for n in hf_names], combination)
        for module in EXTRA_STATE_MODULES[impl]:
            state[f"decoder.layers.{local}.{module}._extra_state"] = None
    return {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": state}


def _full_tensor(read_hf: Callable[[str], torch.Tensor], hf_names: list[str], combination: str,
                 shape: LlamaShape, args: argparse.Namespace, dtype: torch.dtype) -> torch.Tensor:
    hf = []
    for name in hf_names:
        tensor = read_hf(name)
        if tuple(tensor.shape) != hf_tensor_shape(name, shape):
            raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, config.json's sizes give "
                                  f"{hf_tensor_shape(name, shape)}: the checkpoint does not match its config")
        hf.append(tensor)
    return to_megatron(combination, hf, shape, args.padded_vocab_size).to(dtype)


class _RankFiles:
    """The skeleton rank files open for writing, each tensor's byte offset read back with a meta ``torch.load``."""

    def __init__(self, files: dict[tuple[int, int], str]):
        self.files = files
        self.fds: dict[tuple[int, int], int] = {}
        self.slots: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}

    def __enter__(self) -> _RankFiles:
        self.pool = ThreadPoolExecutor(IO_THREADS)
        for rank, file in self.files.items():
            model = load_torch_file(file, map_location="meta")["model"]  # our own skeleton: weights only
            self.slots[rank] = {key: (t.untyped_storage()._checkpoint_offset, t.untyped_storage().nbytes())
                                for key, t in model.items() if t is not None}
            self.fds[rank] = os.open(file, os.O_WRONLY)
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)

    def write(self, pp_rank: int, key: str, parts: list[torch.Tensor]) -> None:
        """Each TP rank's ``part`` into its hole ``key`` of stage ``pp_rank``, the ranks' files on the pool's threads
        (writes into one file serialize on its inode lock; into different files they run side by side), so at most
        IO_THREADS parts are copied contiguous at a time."""
        futures = [self.pool.submit(self._write_part, (tp_rank, pp_rank), key, part)
                   for tp_rank, part in enumerate(parts)]
        for future in futures:
            future.result()

    def _write_part(self, rank: tuple[int, int], key: str, part: torch.Tensor) -> None:
        offset, nbytes = self.slots[rank][key]
        data = tensor_bytes(part)
        assert data.nbytes == nbytes, (key, data.nbytes, nbytes)  # the skeleton came from the same mapping
        pwrite_all(self.fds[rank], data, offset)


def _pread_chunks(pool: ThreadPoolExecutor, fd: int, data: memoryview, offset: int) -> None:
    """Fill ``data`` from ``fd`` at ``offset`` in IO_CHUNK pieces on the pool's threads (reads of one file run side
    by side: os calls release the GIL); returns when all are done, raising the first error."""
    futures = [pool.submit(pread_all, fd, data[start:start + IO_CHUNK], offset + start)
               for start in range(0, data.nbytes, IO_CHUNK)]
    for future in futures:
        future.result()


@contextlib.contextmanager
def without_crc32():
    """torch.save spends ~3/4 of its time on zip CRC32s; loading does not need them (torch.load skips absent ones)."""
    from torch.utils.serialization import config

    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = saved


# --- reading -----------------------------------------------------------------------------------------------------

def read_torch(path: str, args: argparse.Namespace,
               allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TP=1/PP=1 megatron name, full tensor)`` stage by stage, each tensor read from every TP rank's file and
    merged; one tensor in memory at a time."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files = torch_rank_files(path, tp, pp)
    for pp_rank in range(pp):
        stage = [files[tp_rank, pp_rank] for tp_rank in range(tp)]
        models = [_skeleton_model(file, allow_pickle) for file in stage]
        for file, model in zip(stage[1:], models[1:]):
            if list(model) != list(models[0]):
                raise CheckpointError(f"{file} and {stage[0]} hold different tensors: the rank files come from "
                                      "different checkpoints; re-copy the checkpoint from where it was saved")
        first_layer = stage_layers(args.num_layers, pp, pp_rank).start
        with contextlib.ExitStack() as opened:
            fds = [os.open(file, os.O_RDONLY) for file in stage]
            for fd in fds:
                opened.callback(os.close, fd)
            pool = opened.enter_context(ThreadPoolExecutor(IO_THREADS))  # shut down (reads done) before the closes
            for key in models[0]:
                if key.endswith("_extra_state"):
                    continue
                parsed = parse_layer_key(key)
                name = key if parsed is None else megatron_layer_name(first_layer + parsed[0], parsed[1])
                yield name, merge_tp(name, [_read_tensor(pool, fd, file, key, model[key])
                                            for fd, file, model in zip(fds, stage, models)])


def _skeleton_model(file: str, allow_pickle: bool) -> dict:
    """A rank file's ``model`` state dict with meta tensors (dtype, size, stride, file offset; no bytes read)."""
    state = load_torch_file(file, allow_pickle, map_location="meta")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{file} holds no 'model' state dict: not a Megatron-LM torch-format rank file")
    return state["model"]


def _read_tensor(pool: ThreadPoolExecutor, fd: int, file: str, key: str, meta: object) -> torch.Tensor:
    """The saved tensor ``meta`` describes, read from its extent only (a view into a larger shared storage, as
    Megatron-LM's training may save, costs its own bytes, not its storage's)."""
    if not isinstance(meta, torch.Tensor):
        raise CheckpointError(f"{file}: {key} is a {type(meta).__name__}, not a tensor")
    if meta.numel() == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    storage, size = meta.untyped_storage(), meta.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(meta.shape, meta.stride()))
    if (meta.storage_offset() + extent) * size > storage.nbytes():
        raise CheckpointError(f"{file}: {key} reaches past its storage: the file is damaged, re-copy the checkpoint "
                              "from where it was saved")
    out = torch.empty(extent, dtype=meta.dtype)
    try:
        _pread_chunks(pool, fd, tensor_bytes(out),
                      storage._checkpoint_offset + meta.storage_offset() * size)
    except EOFError as e:
        raise CheckpointError(f"{file} is truncated ({key}: {e}): re-copy the checkpoint from where it was "
                              "saved") from None
    return out.as_strided(meta.shape, meta.stride())
