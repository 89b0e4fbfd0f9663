"""Positional file reads and writes for the checkpoint writers, each system call at most WRITE_CHUNK bytes.

Why the cap: a ``write`` of 2 MiB or more makes ext4 put the data in 2 MiB page-cache folios, and on a virtual
machine that hands idle free memory back to its host (free page reporting, order 9 = 2 MiB: the machines these
tests and benchmarks run on) every such folio is a fresh host page fault per 4 KiB. Measured here (2026-12-03),
512 MiB from a tensor into a new file: 0.12-0.14 s in 64 KiB - 1 MiB writes, 4.2-7.9 s in 2-16 MiB writes (a
page-cache ``copyfile`` of the same bytes, which splices 64 KiB at a time: 0.14 s). On other machines 1 MiB
writes cost ~1000 system calls per GB, nothing measurable.
"""

from __future__ import annotations

import io
import os

import torch

WRITE_CHUNK = 2**20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in row-major order: its own memory when contiguous (writable, a read target),
    else a contiguous copy's."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` into ``fd`` at ``offset``, WRITE_CHUNK at a time."""
    while data:
        written = os.pwrite(fd, data[:WRITE_CHUNK], offset)
        data, offset = data[written:], offset + written


def pread_all(fd: int, data: memoryview, offset: int) -> None:
    """Fill ``data`` from ``fd`` at ``offset``; EOFError where the file ends first."""
    while data:
        read = os.preadv(fd, [data], offset)
        if read == 0:
            raise EOFError(f"{data.nbytes} bytes missing at offset {offset}")
        data, offset = data[read:], offset + read


class _CappedFileIO(io.FileIO):
    """A raw file whose ``write`` takes at most WRITE_CHUNK bytes (a raw stream may write fewer than it is given;
    io.BufferedWriter writes the rest)."""

    def write(self, b) -> int:
        return super().write(memoryview(b).cast("B")[:WRITE_CHUNK])


def open_capped_writer(path: str | os.PathLike) -> io.BufferedWriter:
    """``open(path, "wb")`` whose system calls write at most WRITE_CHUNK bytes each."""
    return io.BufferedWriter(_CappedFileIO(path, "wb"), buffer_size=WRITE_CHUNK)
