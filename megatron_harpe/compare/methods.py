"""Each method's stage 1: the RoPE flags of :mod:`megatron_harpe.recipes`, scaled to the preset, and its stages.

All methods start from stage 0's checkpoint (base 10k at L0) and spend the same tokens at the same tokens per step,
data order and seed; only the RoPE (and, for multi-stage ABF, the length schedule) differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_harpe import recipes
from megatron_harpe.command import UsageError
from megatron_harpe.compare.presets import BASE0, ComparePreset

METHODS = ("none", "harpe_peak_valley", "harpe_uniform", "abf", "abf_multistage", "pi", "yarn")
LABELS = {"none": "no extension", "harpe_peak_valley": "HARPE (peak-valley)", "harpe_uniform": "HARPE (uniform)",
          "abf": "single-stage ABF", "abf_multistage": "multi-stage ABF", "pi": "PI", "yarn": "YaRN"}
# Multi-stage ABF as the paper's (1M, 32k) -> (2M, 64k) -> (5M, 128k): fractions of L1 and of the ABF base,
# equal tokens per stage.
ABF_STAGES = ((1 / 4, 1 / 5), (1 / 2, 2 / 5), (1.0, 1.0))


@dataclass(frozen=True)
class Stage:
    seq_length: int
    global_batch_size: int
    train_iters: int
    rope: tuple[str, ...]


def rope_flags(method: str, preset: ComparePreset) -> list[str]:
    """The single-stage methods' RoPE at L1 (multi-stage ABF: its last stage's)."""
    shape = preset.shape
    if method == "none":
        return recipes.abf_rope(BASE0)
    if method in ("abf", "abf_multistage"):
        return recipes.abf_rope(preset.abf_base)
    if method == "pi":
        return recipes.pi_rope(shape, preset.extension)
    if method == "yarn":
        return recipes.yarn_rope(shape.with_sizes(max_position_embeddings=preset.l0), preset.extension)
    low, high, stride = preset.harpe_range
    if method == "harpe_peak_valley":
        bases = ["--harpe-strategy", "peak_valley", "--harpe-stride", recipes.flag_value(stride)]
    elif method == "harpe_uniform":
        bases = ["--harpe-strategy", "uniform"]
    else:
        raise UsageError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    return recipes.harpe_rope(shape, [*bases, "--harpe-base-min", recipes.flag_value(low),
                                      "--harpe-base-max", recipes.flag_value(high)])


def stages(method: str, preset: ComparePreset) -> list[Stage]:
    s1 = preset.stage1
    if method != "abf_multistage":
        return [Stage(preset.l1, s1.global_batch_size, s1.iters, tuple(rope_flags(method, preset)))]
    if s1.iters < len(ABF_STAGES):
        raise UsageError(f"multi-stage ABF needs stage-1 iterations >= {len(ABF_STAGES)} (one per stage)")
    share = [s1.iters // len(ABF_STAGES)] * len(ABF_STAGES)
    share[-1] += s1.iters - sum(share)
    result = []
    for (length_fraction, base_fraction), iters in zip(ABF_STAGES, share):
        length = int(preset.l1 * length_fraction)
        batch = s1.global_batch_size * preset.l1 // length  # the same tokens per step at every stage
        base = round(preset.abf_base * base_fraction, -2)
        result.append(Stage(length, batch, iters, tuple(recipes.abf_rope(base))))
    return result


def check_methods(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return names
