"""file_io: every write system call of the converters is at most WRITE_CHUNK bytes (larger ones land in 2 MiB
page-cache folios, which a VM with free page reporting serves from its host: file_io's docstring), and the files
come out whole."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_harpe.convert import file_io
from megatron_harpe.convert.cli import hf_to_megatron, megatron_to_hf
from tiny_checkpoints import copy_of

CAP = 4096  # the tiny model's tensors are 1-77 KB: most need several writes


def test_pwrite_all_takes_short_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(file_io, "WRITE_CHUNK", CAP)
    data = bytes(range(256)) * 100  # 25600 bytes
    sizes, pwrite = [], os.pwrite

    def short(fd, chunk, offset):  # the kernel may write less than asked
        sizes.append(len(chunk))
        return pwrite(fd, chunk[:1000], offset)

    monkeypatch.setattr(os, "pwrite", short)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    file_io.pwrite_all(fd, memoryview(data), 10)
    os.close(fd)
    assert max(sizes) == CAP and (tmp_path / "f").read_bytes() == b"\0" * 10 + data


def test_capped_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(file_io, "WRITE_CHUNK", CAP)
    raw = file_io._CappedFileIO(tmp_path / "raw", "wb")
    assert raw.write(b"x" * (3 * CAP + 5)) == CAP  # a raw stream may write less; the buffered one finishes it
    raw.close()
    data = os.urandom(5 * CAP + 123)
    with file_io.open_capped_writer(tmp_path / "f") as f:
        f.write(b"ab")
        f.write(memoryview(data))
        assert f.tell() == len(data) + 2
    assert (tmp_path / "f").read_bytes() == b"ab" + data


@pytest.fixture
def recorded_writes(monkeypatch):
    """Sizes of every write the converters' file_io makes, WRITE_CHUNK set to CAP."""
    monkeypatch.setattr(file_io, "WRITE_CHUNK", CAP)
    sizes, pwrite, write = [], os.pwrite, file_io._CappedFileIO.write

    def recording_pwrite(fd, data, offset):
        sizes.append(len(data))
        return pwrite(fd, data, offset)

    def recording_write(self, b):
        written = write(self, b)
        sizes.append(written)
        return written

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    monkeypatch.setattr(file_io._CappedFileIO, "write", recording_write)
    return sizes


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_every_write_is_capped(tmp_path, request, recorded_writes, fmt):
    """Both imports and the export write only through file_io, capped; the results are the usual ones (the
    export of the import equals the source)."""
    hf = copy_of("hf", tmp_path / "hf", request.getfixturevalue)
    assert hf_to_megatron(["--hf-dir", str(hf), "--out", str(tmp_path / "m"), "--format", fmt,
                           "--dtype", "fp32"]) == 0
    imported = list(recorded_writes)
    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "back"),
                           "--allow-pickle"]) == 0
    exported = recorded_writes[len(imported):]
    source = load_file(str(hf / "model.safetensors"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in source.values())
    for sizes in (imported, exported):
        assert max(sizes) == CAP and sum(sizes) >= tensor_bytes  # capped, and every tensor byte went through
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(source) and all(torch.equal(back[n], source[n].float()) for n in source)
