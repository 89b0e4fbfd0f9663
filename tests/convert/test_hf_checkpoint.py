"""hf_checkpoint.HFWriter: safetensors shards laid out up front, each tensor written into its place on arrival.
The reference is the safetensors library itself: its loader reads every shard back exactly."""

import gc
import json
import os
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_harpe.convert.hf_checkpoint import HFWriter
from megatron_harpe.convert.mapping import ConversionError

SHAPES = [("a.weight", (7, 5)), ("b.weight", (3,)), ("c.weight", (16, 4)), ("d.weight", (1, 9)),
          ("e.weight", (2, 3, 4)), ("f.weight", (11,))]


def tensors(dtype):
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shards_read_back_by_safetensors(tmp_path, dtype):
    values = tensors(dtype)
    size = values["a.weight"].element_size()
    limit = 40 * size  # elements: a 35, b 3, c 64, d 9, e 24, f 11
    with HFWriter(str(tmp_path), SHAPES, dtype, limit) as writer:
        for name in reversed(list(values)):  # any order: each tensor has its place already
            writer.add(name, values[name])
        writer.finish()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    # Greedy in the given order, a new shard where the next tensor would pass the limit (a tensor larger than the
    # limit gets a shard of its own).
    expected = {"a.weight": 1, "b.weight": 1, "c.weight": 2, "d.weight": 3, "e.weight": 3, "f.weight": 4}
    files = {name: f"model-{n:05d}-of-00004.safetensors" for name, n in expected.items()}
    assert index["weight_map"] == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in values.values())
    assert sorted(os.listdir(tmp_path)) == sorted({*files.values(), "model.safetensors.index.json"})
    for file in set(files.values()):
        loaded = load_file(str(tmp_path / file))
        assert set(loaded) == {n for n, f in files.items() if f == file}
        for name, tensor in loaded.items():
            assert tensor.dtype == dtype and torch.equal(tensor, values[name])
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers checks it


def test_one_shard_is_model_safetensors(tmp_path):
    values = tensors(torch.bfloat16)
    with HFWriter(str(tmp_path), SHAPES, torch.bfloat16) as writer:
        for name, tensor in values.items():
            writer.add(name, tensor.t().contiguous().t() if tensor.dim() == 2 else tensor)  # non-contiguous too
        writer.finish()
    assert os.listdir(tmp_path) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[n], values[n]) for n in values)


def test_nothing_is_kept(tmp_path):
    """The writer streams: a tensor is no longer referenced once add returns (no shard buffer)."""
    values = tensors(torch.float32)
    with HFWriter(str(tmp_path), SHAPES, torch.float32, 64) as writer:
        for name, _ in SHAPES:
            tensor = values.pop(name)
            ref = weakref.ref(tensor)
            writer.add(name, tensor)
            del tensor
            gc.collect()
            assert ref() is None, name
        writer.finish()


def test_refusals(tmp_path):
    values = tensors(torch.bfloat16)
    with HFWriter(str(tmp_path), SHAPES, torch.bfloat16) as writer:
        with pytest.raises(ConversionError, match="z.weight: not a tensor of this model"):
            writer.add("z.weight", values["a.weight"])
        with pytest.raises(ConversionError, match=r"a.weight: \(5, 7\) torch.bfloat16, the checkpoint's sizes give "
                                                  r"\(7, 5\) torch.bfloat16"):
            writer.add("a.weight", values["a.weight"].t())
        with pytest.raises(ConversionError, match="b.weight: .* torch.float32, .* torch.bfloat16"):
            writer.add("b.weight", values["b.weight"].float())
        writer.add("c.weight", values["c.weight"])
        with pytest.raises(ConversionError, match="c.weight: not a tensor of this model, or given twice"):
            writer.add("c.weight", values["c.weight"])
        with pytest.raises(ConversionError, match=r"3 tensors never came \(first: d.weight\)"):
            writer.finish()
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(".tmp")]  # nothing named as finished


def test_a_full_disk_while_laying_out_leaves_no_file_open(tmp_path, monkeypatch):
    import errno

    ftruncate, calls = os.ftruncate, []

    def full_on_the_second(fd, size):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return ftruncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", full_on_the_second)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space"):
        HFWriter(str(tmp_path), SHAPES, torch.float32, 64)
    assert len(os.listdir("/proc/self/fd")) == open_before
