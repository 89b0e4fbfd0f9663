"""Needle-in-a-Haystack (context length x needle depth) and passkey retrieval, on the resumable grid.

Each cell builds a context of exactly ``length`` tokens (BOS included) with the needle inserted at the sentence
boundary at or before ``depth`` (``megatron_harpe.data.synthetic``), asks the question and decodes greedily.
NIAH is scored with ``scoring.string_match_all``, passkey with ``scoring.passkey_score``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from megatron_harpe.data.synthetic import needle_sample, passkey_sample
from megatron_harpe.eval.grid import run_grid
from megatron_harpe.eval.scoring import passkey_score, string_match_all

if TYPE_CHECKING:  # the settings are built, and old results checked, before torch loads
    from megatron_harpe.eval.model import EvalModel


@dataclass
class NiahSettings:
    lengths: list[int]
    depths: list[float]
    style: str = "classic"                  # classic (San Francisco) | ruler (magic number, single needle)
    needle: list[str] | None = None     # [needle, question, answer] instead of the style's
    haystack_file: str | None = None     # default: the built-in synthetic filler
    max_new_tokens: int = 32
    batch_size: int = 1
    seed: int = 0


def haystack_from_file(path: str) -> Callable[[], str]:
    with open(path, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"{path} holds no text to build a haystack from")
    cycle = itertools.cycle(paragraphs)
    return lambda: next(cycle)


def run_niah(model: EvalModel, settings: NiahSettings, results_path: str, progress: bool = True,
             force: bool = False) -> dict:
    haystack = haystack_from_file(settings.haystack_file) if settings.haystack_file else None
    needle = tuple(settings.needle) if settings.needle else None

    def make(length, depth):
        sample = needle_sample(model.encode, model.decode, context_tokens=length - 1, depth=depth, seed=settings.seed,
                               style=settings.style, needle=needle, haystack=haystack)
        return sample.input_ids, sample.answer, {"needle_position": sample.needle_position + 1}

    return run_grid(model, asdict(settings), settings.lengths, settings.depths, make, string_match_all, results_path,
                    batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, desc="needle-in-a-haystack",
                    progress=progress, tool="eval_niah", force=force)


@dataclass
class PasskeySettings:
    lengths: list[int]
    trials: int = 5                         # pass keys per length, hidden at evenly spaced depths
    max_new_tokens: int = 8
    batch_size: int = 1
    seed: int = 0


def run_passkey(model: EvalModel, settings: PasskeySettings, results_path: str, progress: bool = True,
                force: bool = False) -> dict:
    depths = list(np.linspace(0.0, 1.0, settings.trials).round(4)) if settings.trials > 1 else [0.5]

    def make(length, depth):
        key = int(np.random.default_rng([settings.seed, length, int(depth * 1e4)]).integers(10_000, 100_000))
        sample = passkey_sample(model.encode, model.decode, context_tokens=length - 1, depth=depth, passkey=key)
        return sample.input_ids, sample.answer, {"needle_position": sample.needle_position + 1}

    return run_grid(model, asdict(settings), settings.lengths, depths, make, passkey_score, results_path,
                    batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, desc="passkey",
                    progress=progress, tool="eval_passkey", force=force)
