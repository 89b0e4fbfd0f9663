"""Tiny checkpoints for the conversion safety tests and misuse rows: built once per session, copied per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

_BUILT: dict[str, Path] = {}


def make_hf(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def _build(kind: str, root: Path) -> Path:
    from megatron_harpe.convert.cli import hf_to_megatron, megatron_to_hf

    if kind == "hf":
        return make_hf(root / "hf")
    if kind in ("torch", "torch_dist"):
        out = root / kind
        assert hf_to_megatron(["--hf-dir", str(template("hf", root)), "--out", str(out), "--format", kind,
                               "--dtype", "fp32"]) == 0
        return out
    if kind == "export":
        out = root / "export"
        assert megatron_to_hf(["--megatron-dir", str(template("torch", root)), "--out", str(out)]) == 0
        return out
    raise KeyError(kind)


def template(kind: str, root: Path) -> Path:
    if kind not in _BUILT:
        _build(kind, root)
        _BUILT[kind] = root / kind
    return _BUILT[kind]


def copy_of(kind: str, dest: Path, getfixturevalue: Callable[[str], object]) -> Path:
    """A private copy of the session's ``kind`` checkpoint at ``dest``."""
    root = Path(getfixturevalue("tmp_path_factory").getbasetemp()) / "tiny-checkpoints"
    root.mkdir(exist_ok=True)
    shutil.copytree(template(kind, root), dest)
    return dest


def rank_file(checkpoint: Path) -> Path:
    return checkpoint / "release" / "mp_rank_00" / "model_optim_rng.pt"


class Payload:
    """Unpickling this creates ``marker``: what a ``__reduce__`` payload in a checkpoint can do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def add_payload(checkpoint: Path, marker: Path) -> None:
    """Rewrite a torch-format checkpoint we wrote with a code-running object beside its weights."""
    import torch

    state = torch.load(rank_file(checkpoint), weights_only=True)  # our own file: safe to read as tensors
    state["payload"] = Payload(str(marker))
    torch.save(state, rank_file(checkpoint))


def truncate(file: Path, keep: float = 0.5) -> None:
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))
