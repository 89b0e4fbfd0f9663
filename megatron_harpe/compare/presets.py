"""The scale of a comparison: model, lengths, token budgets, evaluation grid.

Every preset keeps the paper's proportions, scaled: stage 0 trains at L0 with base 10k (Llama-2's 4k), stage 1
extends to L1 = 8 x L0 (the paper: 32 x), every method with the same tokens, data order and seed, and the evaluation
runs from L0 to 2 x L1 (past the trained length, where methods differ most). How the sizes were chosen is in
benchmarks/README.md ("compare_methods"). One proportion is not kept yet: Llama-2's longest RoPE wavelength (~54k
tokens) is shorter than 128k, while base 10k at the cpu preset's head dim 32 reaches ~35k, far past L1 = 1024, so
there continued training without a new base ("none") extends as well as any method (measured, same README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megatron_harpe.command import UsageError
from megatron_harpe.shape import LlamaShape

BASE0 = 10_000.0  # Llama-2's RoPE base: stage 0's
# The paper raises Llama-2's base 500-fold (10k -> 5M) for a 32-fold extension (4k -> 128k); a preset's ABF base
# keeps that exponent: BASE0 * extension ** (ln 500 / ln 32).
ABF_EXPONENT = math.log(500) / math.log(32)
# HARPE's search range and stride as the paper's, relative to the ABF base: [1M, 5M] at 30k around 5M.
HARPE_RANGE = (1 / 5, 1.0)
HARPE_STEPS = (5e6 - 1e6) / 3e4

RULER_TASKS = ("single_1", "single_2", "single_3", "multikey_1", "multikey_2", "multikey_3", "multivalue",
               "multiquery")


@dataclass(frozen=True)
class Training:
    """One stage's budget. Stage 0 pretrains from scratch at L0 on documents of L0 tokens; stage 1 continues at
    L1 from stage 0's checkpoint on documents of L1 tokens, once per method and seed (multi-stage ABF spends the
    same tokens over its three stages)."""

    iters: int
    global_batch_size: int
    lr: str
    warmup_iters: int
    docs: int  # corpus documents, each as long as the stage's sequences
    min_lr: str | None = None  # cosine decay to it; None: constant lr, as the paper's stage 1


@dataclass(frozen=True)
class EvalGrid:
    passkey_trials: int
    niah_depths: tuple[float, ...]
    ruler_samples: int
    ruler_tasks: tuple[str, ...] = RULER_TASKS
    perplexity_stride: int = 256
    batch_size: int = 4


@dataclass(frozen=True)
class ComparePreset:
    name: str
    description: str
    shape: LlamaShape
    l0: int
    stage0: Training
    stage1: Training
    eval: EvalGrid
    extension: int = 8
    seeds: int = 3
    micro_batch_size: int = 1  # at most; a stage with a smaller global batch takes it whole
    vocab_size: int = 2000  # the corpus tokenizer's pieces
    # The retrieval tasks the corpus carries (data.synthetic.retrieval_kinds); None: all of them.
    kinds: tuple[str, ...] | None = None
    compact_engine: bool = True  # the compact engine (CPUs); False: megatron.training on a GPU
    extra_flags: tuple[str, ...] = field(default=())

    @property
    def l1(self) -> int:
        return self.l0 * self.extension

    @property
    def eval_lengths(self) -> list[int]:
        """L0, 2 L0, ..., L1, 2 L1."""
        return [self.l0 * 2**k for k in range(int(math.log2(self.extension)) + 2)]

    @property
    def abf_base(self) -> float:
        return round(BASE0 * self.extension**ABF_EXPONENT, -2)

    @property
    def harpe_range(self) -> tuple[float, float, float]:
        """(base_min, base_max, stride) of HARPE's search at this scale."""
        low, high = (round(self.abf_base * f, -2) for f in HARPE_RANGE)
        return low, high, round((high - low) / HARPE_STEPS, 1)

    def with_seeds(self, seeds: int) -> ComparePreset:
        if seeds < 1:
            raise UsageError(f"--seeds {seeds}: give at least 1")
        return replace(self, seeds=seeds)

    def summary(self) -> dict:
        """What the results were computed with (also what a resumed run must match)."""
        from dataclasses import asdict

        summary = asdict(self)
        summary["shape"] = {k: v for k, v in asdict(self.shape).items() if v is not None}
        summary.update(l1=self.l1, eval_lengths=self.eval_lengths, abf_base=self.abf_base,
                       harpe_range=list(self.harpe_range))
        return summary


def _shape(layers: int, hidden: int, heads: int, groups: int, vocab: int) -> LlamaShape:
    return LlamaShape(num_layers=layers, hidden_size=hidden, ffn_hidden_size=3 * hidden, num_attention_heads=heads,
                      num_query_groups=groups, vocab_size=vocab, name="compare")


PRESETS = {
    # End to end in a few minutes: checks the chain and the files it writes; its numbers mean nothing.
    "ci": ComparePreset(
        name="ci", description="the pipeline end to end in minutes (asserts no outcome)",
        shape=_shape(2, 32, 4, 2, 1000), l0=256, extension=2, seeds=1, vocab_size=1000,
        stage0=Training(iters=3, global_batch_size=2, lr="1e-3", warmup_iters=1, docs=24),
        stage1=Training(iters=3, global_batch_size=1, lr="1e-3", warmup_iters=0, docs=6),
        eval=EvalGrid(passkey_trials=1, niah_depths=(0.5,), ruler_samples=1, ruler_tasks=("single_1",),
                      perplexity_stride=256, batch_size=1)),
    # Sizes from the stage-0 search in benchmarks/README.md ("compare_methods"): the smallest that retrieves at L0.
    "cpu": ComparePreset(
        name="cpu", description="two CPU cores, about 50 minutes (3 seeds)",
        shape=_shape(2, 128, 4, 2, 2000), l0=128, micro_batch_size=32,
        kinds=("passkey", "niah-ruler", "niah-lwm", "ruler-single_1"),
        stage0=Training(iters=2400, global_batch_size=32, lr="3e-3", min_lr="3e-4", warmup_iters=100, docs=50000),
        stage1=Training(iters=250, global_batch_size=4, lr="3e-4", warmup_iters=10, docs=1000),
        # RULER's other tasks do not fit in L0 = 128 tokens.
        eval=EvalGrid(passkey_trials=10, niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0), ruler_samples=5,
                      ruler_tasks=("single_1", "single_2"), batch_size=5)),
    # Not yet run (no GPU in the session that wrote it): the cpu preset's recipe, twice the length and 4x the model.
    "gpu": ComparePreset(
        name="gpu", description="one H200, under 8 minutes (megatron.training)",
        shape=_shape(4, 256, 8, 4, 4000), l0=256, micro_batch_size=16, vocab_size=4000, compact_engine=False,
        extra_flags=("--bf16",),
        kinds=("passkey", "niah-ruler", "niah-lwm", "ruler-single_1"),
        stage0=Training(iters=3000, global_batch_size=64, lr="2e-3", min_lr="2e-4", warmup_iters=100, docs=200000),
        stage1=Training(iters=250, global_batch_size=8, lr="2e-4", warmup_iters=10, docs=2000),
        eval=EvalGrid(passkey_trials=20, niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0), ruler_samples=10,
                      ruler_tasks=("single_1", "single_2"), batch_size=16)),
}


def preset(name: str) -> ComparePreset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose {', '.join(PRESETS)} or paper")
    return PRESETS[name]
