"""The paper's training recipes as Megatron-LM flags: HARPE, its baselines (ABF in one and in three stages, PI,
YaRN), each from a :class:`~megatron_harpe.shape.LlamaShape` and the run's :class:`Settings`.

``examples/pretrain_llama2_*.sh`` ask ``python -m megatron_harpe.recipes RECIPE --shell`` for their command (the
settings are the environment variables those scripts document), the planner calls the functions directly, and
``benchmarks/gpu_check.sh`` takes the shared part (``--part base``). No torch or megatron import: a launch script
asks before anything heavy starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

from megatron_harpe.command import UsageError, run_command
from megatron_harpe.shape import SHAPES, LlamaShape

# Fu et al. 2024 (followed by the paper): about 4M tokens per step, 6B tokens, lr 2e-5 constant.
TOKENS_PER_STEP = 4 * 1024 * 1024
TRAIN_TOKENS = 6_000_000_000
RECOMPUTE_CHOICES = ("full", "block", "selective", "none")

# NNODES TP PP CP chosen to fit 8 x 80 GB GPUs per node at 131072 tokens, bf16, full recompute, DP=1
# (tools/plan_parallelism.py lists the others that fit).
DEFAULT_LAYOUTS = {"7b": (1, 4, 1, 2), "13b": (2, 8, 1, 2), "70b": (16, 8, 4, 4), "tiny": (1, 1, 1, 1)}

# Table 2 has one base per head of Llama-2-7B; other shapes search their own with the paper's Algorithm 1.
PAPER_BASES = ("--harpe-bases", "paper-llama2-7b")
SEARCHED_BASES = ("--harpe-strategy", "peak_valley", "--harpe-base-min", "1e6", "--harpe-base-max", "5e6",
                  "--harpe-stride", "30000")

# Multi-stage ABF: (RoPE base, tokens) per stage, each from the previous stage's checkpoint.
ABF_STAGES = ((1_000_000, 32768), (2_000_000, 65536), (5_000_000, 131072))
STAGE_TOKENS = 2_000_000_000  # 6B split evenly


@dataclass(frozen=True)
class Settings:
    """A run's layout and training settings (``examples/llama2_common.sh``'s environment variables).

    Values Megatron reads as floats (``lr``, ``weight_decay``) stay the text given: the launch scripts print them
    as typed. ``global_batch_size`` and ``train_iters`` left None follow from ``tokens_per_step`` and
    ``train_tokens``. ``cpu`` is the tiny CPU run: megatron's local spec, fp32, none of the GPU-only flags.
    """

    nnodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    cp: int = 1
    seq_length: int = 131072
    micro_batch_size: int = 1
    tokens_per_step: int = TOKENS_PER_STEP
    train_tokens: int = TRAIN_TOKENS
    global_batch_size: int | None = None
    train_iters: int | None = None
    lr: str = "2e-5"
    warmup_iters: int = 20
    weight_decay: str = "0.1"  # not stated by the paper; Llama-2's pretraining value
    save_interval: int = 100
    log_interval: int = 1
    eval_interval: int = 100
    eval_iters: int = 4
    seed: int = 1234
    recompute: str = "full"
    recompute_num_layers: int = 1  # block: layers per pipeline stage recomputed in full
    attention_backend: str = "auto"  # the launch scripts pass the flash-attn probe's answer
    cpu: bool = False
    save: str = "checkpoints/llama2-7b-harpe"
    load: str = ""  # a converted Hugging Face checkpoint to fine-tune from (tools/convert_hf_to_megatron.py)
    mock_data: bool = False
    vocab_size: int = 32000  # with mock data
    data_path: tuple[str, ...] = ()  # a Megatron blend: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...
    tokenizer_model: str = ""
    split: str = "99990,8,2"
    extra_args: tuple[str, ...] = ()  # more pretrain_harpe.py flags, last (Megatron keeps a flag's last value)

    def __post_init__(self):
        if not self.cpu and self.recompute not in RECOMPUTE_CHOICES:  # the CPU run recomputes nothing
            raise UsageError(f"RECOMPUTE={self.recompute}: choose full, block, selective or none")
        if self.seq_length < 1:
            raise UsageError(f"SEQ_LENGTH={self.seq_length}: give a whole number of tokens > 0")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def batch(self) -> int:
        return self.global_batch_size or self.tokens_per_step // self.seq_length

    @property
    def iterations(self) -> int:
        return self.train_iters or -(-self.train_tokens // (self.batch * self.seq_length))

    @classmethod
    def from_env(cls, env: Mapping[str, str], model: str = "7b", run_name: str | None = None) -> Settings:
        """The settings ``env`` gives (unset or empty: the default), for the preset ``model``'s default layout."""
        def get(name: str, default=None):
            return env.get(name) or default

        def whole(name: str, default: int | None) -> int | None:
            return _whole(env, name, default)

        nnodes, tp, pp, cp = DEFAULT_LAYOUTS.get(model, (1, 1, 1, 1))
        run_name = get("RUN_NAME", run_name or f"llama2-{model}-harpe")
        return cls(
            nnodes=whole("NNODES", nnodes), gpus_per_node=whole("GPUS_PER_NODE", 8),
            tp=whole("TP", tp), pp=whole("PP", pp), cp=whole("CP", cp), seq_length=whole("SEQ_LENGTH", 131072),
            micro_batch_size=whole("MBS", 1), tokens_per_step=whole("TOKENS_PER_STEP", TOKENS_PER_STEP),
            train_tokens=whole("TRAIN_TOKENS", TRAIN_TOKENS), global_batch_size=whole("GBS", None),
            train_iters=whole("TRAIN_ITERS", None), lr=get("LR", "2e-5"), warmup_iters=whole("WARMUP_ITERS", 20),
            weight_decay=get("WEIGHT_DECAY", "0.1"), save_interval=whole("SAVE_INTERVAL", 100),
            log_interval=whole("LOG_INTERVAL", 1), eval_interval=whole("EVAL_INTERVAL", 100),
            eval_iters=whole("EVAL_ITERS", 4), seed=whole("SEED", 1234), recompute=get("RECOMPUTE", "full"),
            recompute_num_layers=whole("RECOMPUTE_NUM_LAYERS", 1), attention_backend=get("ATTENTION_BACKEND", "auto"),
            cpu=model == "tiny", save=get("SAVE", f"checkpoints/{run_name}"), load=get("LOAD", ""),
            mock_data=get("MOCK_DATA") == "1", vocab_size=whole("VOCAB_SIZE", 32000),
            data_path=tuple(get("DATA_PATH", "").split()), tokenizer_model=get("TOKENIZER_MODEL", ""),
            split=get("SPLIT", "99990,8,2"), extra_args=tuple(get("EXTRA_ARGS", "").split()))


def _whole(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value}: give a whole number") from None


def flag_value(value: float | str) -> str:
    """A number as a flag value: text as given, whole floats without the '.0' (5e6 -> 5000000), exponents
    unpadded (1e-5)."""
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return re.sub(r"e([+-])0+(\d)", r"e\1\2", repr(value))  # 1e-05 -> 1e-5


# --- the parts every recipe shares ---------------------------------------------------------------------------

def base_flags(shape: LlamaShape, settings: Settings) -> list[str]:
    """Llama-2's architecture, the batch and optimiser of the paper, and the parallel layout."""
    s = settings
    return [*shape.to_megatron_flags(),
            "--seq-length", str(s.seq_length), "--max-position-embeddings", str(s.seq_length),
            "--normalization", "RMSNorm", "--norm-epsilon", flag_value(shape.norm_eps), "--swiglu",
            "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
            "--hidden-dropout", "0",
            "--micro-batch-size", str(s.micro_batch_size), "--global-batch-size", str(s.batch),
            "--train-iters", str(s.iterations),
            "--lr", s.lr, "--min-lr", s.lr, "--lr-decay-style", "constant", "--lr-warmup-iters", str(s.warmup_iters),
            "--optimizer", "adam", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", s.weight_decay,
            "--clip-grad", "1.0",
            "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
            "--context-parallel-size", str(s.cp)]


def run_flags(settings: Settings, placeholders: bool = False) -> list[str]:
    """Logging, checkpoints, the engine (Transformer Engine on GPUs, the local spec for the CPU run) and data.

    ``placeholders``: ``<DATA_PATH>`` and ``<TOKENIZER_MODEL>`` where they are unset (a dry run's command)."""
    s = settings
    flags = ["--no-create-attention-mask-in-dataloader", "--seed", str(s.seed),
             "--log-interval", str(s.log_interval), "--eval-interval", str(s.eval_interval),
             "--eval-iters", str(s.eval_iters), "--save-interval", str(s.save_interval),
             "--ckpt-format", "torch_dist", "--save", s.save, "--load", s.save]
    if s.cpu:
        flags += ["--transformer-impl", "local"]  # megatron's local spec with the SDPA core attention
    else:
        flags += ["--bf16", "--transformer-impl", "transformer_engine", "--attention-backend", s.attention_backend,
                  "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                  "--distributed-timeout-minutes", "60"]
        if s.tp > 1:
            flags += ["--sequence-parallel"]
        flags += {"full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1"],
                  "block": ["--recompute-granularity", "full", "--recompute-method", "block",
                            "--recompute-num-layers", str(s.recompute_num_layers)],
                  "selective": ["--recompute-granularity", "selective"],
                  "none": []}[s.recompute]
    # The first run fine-tunes from LOAD; a restart resumes from SAVE (Megatron's --pretrained-checkpoint).
    if s.load:
        flags += ["--pretrained-checkpoint", s.load]
    if s.mock_data:
        return flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(s.vocab_size)]
    data, tokenizer = list(s.data_path), s.tokenizer_model
    if placeholders:
        data, tokenizer = data or ["<DATA_PATH>"], tokenizer or "<TOKENIZER_MODEL>"
    return flags + ["--data-path", *data, "--split", s.split, "--tokenizer-type", "Llama2Tokenizer",
                    "--tokenizer-model", tokenizer]


def _recipe(shape: LlamaShape, settings: Settings, rope: list[str], placeholders: bool) -> list[str]:
    return [*base_flags(shape, settings), *run_flags(settings, placeholders), *rope, *settings.extra_args]


# --- the rope part of each recipe ------------------------------------------------------------------------------

def harpe_rope(shape: LlamaShape, bases: list[str] | None = None) -> list[str]:
    """``bases``: the ``--harpe-*`` flags that choose them; default Table 2 for 7B, else a peak-valley search."""
    if bases is None:
        bases = list(PAPER_BASES if shape == SHAPES["7b"] else SEARCHED_BASES)
    return ["--position-embedding-type", "rope", *bases]


def abf_rope(base: float | str = 5_000_000) -> list[str]:
    return ["--position-embedding-type", "rope", "--rotary-base", flag_value(base)]


def pi_rope(shape: LlamaShape, factor: float | str = 32) -> list[str]:
    return ["--position-embedding-type", "rope", "--rotary-base", flag_value(shape.rope_theta),
            "--rotary-seq-len-interpolation-factor", flag_value(factor)]


def yarn_rope(shape: LlamaShape, scale: float | str = 32) -> list[str]:
    return ["--position-embedding-type", "yarn", "--rotary-base", flag_value(shape.rope_theta),
            "--rotary-scaling-factor", flag_value(scale),
            "--yarn-original-max-position-embeddings", str(shape.max_position_embeddings)]


# --- the recipes -------------------------------------------------------------------------------------------------

def harpe(shape: LlamaShape, settings: Settings, bases: list[str] | None = None, *,
          placeholders: bool = False) -> list[str]:
    """HARPE single-stage continual pretraining (Lian et al. 2024): one RoPE base per query group."""
    return _recipe(shape, settings, harpe_rope(shape, bases), placeholders)


def abf(shape: LlamaShape, settings: Settings, base: float | str = 5_000_000, *,
        placeholders: bool = False) -> list[str]:
    """Single-stage ABF: one RoPE base (5e6) for every head, otherwise the HARPE recipe."""
    return _recipe(shape, settings, abf_rope(base), placeholders)


def abf_stage_settings(settings: Settings, stage: int, root: str, stage_tokens: int = STAGE_TOKENS) -> Settings:
    """Stage ``stage`` (1-based) of multi-stage ABF: its length, its tokens at the same tokens per step, saved to
    ROOT/stageN, started from the stage before (the first from ``settings.load``)."""
    _, length = ABF_STAGES[stage - 1]
    load = f"{root}/stage{stage - 1}" if stage > 1 else settings.load
    return replace(settings, seq_length=length, train_tokens=stage_tokens, global_batch_size=None, train_iters=None,
                   save=f"{root}/stage{stage}", load=load)


def abf_multistage(shape: LlamaShape, settings: Settings, root: str, stage_tokens: int = STAGE_TOKENS, *,
                   placeholders: bool = False) -> list[list[str]]:
    """Multi-stage ABF, (1e6, 32k) -> (2e6, 64k) -> (5e6, 128k): one command per stage."""
    return [abf(shape, abf_stage_settings(settings, stage, root, stage_tokens), base, placeholders=placeholders)
            for stage, (base, _) in enumerate(ABF_STAGES, 1)]


def pi(shape: LlamaShape, settings: Settings, factor: float | str = 32, *, placeholders: bool = False) -> list[str]:
    """Position Interpolation (Chen et al. 2023): factor 32 (4096 -> 131072) at Llama-2's base."""
    return _recipe(shape, settings, pi_rope(shape, factor), placeholders)


def yarn(shape: LlamaShape, settings: Settings, scale: float | str = 32, *, placeholders: bool = False) -> list[str]:
    """YaRN (Peng et al. 2023): scale 32 over Llama-2's 4096 positions, through megatron's own YaRN RoPE."""
    return _recipe(shape, settings, yarn_rope(shape, scale), placeholders)


# --- the recipes as the launch scripts' environment reads them -------------------------------------------------

# Every environment variable read here (examples/llama2_common.sh passes exactly these: HARPE_SETTINGS).
ENV_NAMES = ("MODEL", "NNODES", "GPUS_PER_NODE", "TP", "PP", "CP", "SEQ_LENGTH", "TOKENS_PER_STEP", "TRAIN_TOKENS",
             "MBS", "GBS", "TRAIN_ITERS", "LR", "WARMUP_ITERS", "WEIGHT_DECAY", "SAVE_INTERVAL", "LOG_INTERVAL",
             "EVAL_INTERVAL", "EVAL_ITERS", "SEED", "RECOMPUTE", "RECOMPUTE_NUM_LAYERS", "RUN_NAME", "SAVE", "LOAD",
             "DATA_PATH", "TOKENIZER_MODEL", "SPLIT", "MOCK_DATA", "VOCAB_SIZE", "ATTENTION_BACKEND", "EXTRA_ARGS",
             "HARPE_ARGS", "ROPE_BASE", "PI_FACTOR", "YARN_SCALE", "STAGE_TOKENS")
RECIPES = ("harpe", "abf", "abf_multistage", "pi", "yarn")


@dataclass(frozen=True)
class Launch:
    """One command of a recipe, as the environment asks for it."""

    model: str
    shape: LlamaShape
    settings: Settings
    rope: list[str]
    placeholders: bool = False
    rope_base: str | None = None  # ABF's base (of this stage), for the launch script's report

    @property
    def flags(self) -> list[str]:
        return _recipe(self.shape, self.settings, self.rope, self.placeholders)


def shape_of(model: str) -> LlamaShape:
    """MODEL: a preset, or a JSON object of sizes (Hugging Face or Megatron names; benchmarks/gpu_check.sh's)."""
    if model in SHAPES:
        return SHAPES[model]
    if model.lstrip().startswith("{"):
        try:
            return LlamaShape.from_config(json.loads(model), "MODEL")
        except json.JSONDecodeError as e:
            raise UsageError(f"MODEL is not a JSON object of sizes: {e}") from None
    raise UsageError(f"unknown MODEL '{model}': choose 7b, 13b, 70b or tiny")


def from_env(recipe: str, env: Mapping[str, str], *, stage: int | None = None, bases: list[str] | None = None,
             placeholders: bool = False) -> Launch:
    """``recipe``'s command for the settings in ``env`` (``stage``: which of multi-stage ABF's; ``bases``: HARPE's
    --harpe-* flags, else ``HARPE_ARGS``, else the shape's default)."""
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}: choose {', '.join(RECIPES)}")
    model = env.get("MODEL") or "7b"
    shape = shape_of(model)
    if recipe == "abf_multistage":
        env = {**env, "SEQ_LENGTH": ""}  # each stage has its own
    settings = Settings.from_env(env, model, run_name=f"llama2-{model}-" + recipe.replace("_", "-"))
    base = None
    if recipe == "harpe":
        rope = harpe_rope(shape, bases or (env["HARPE_ARGS"].split() if env.get("HARPE_ARGS") else None))
    elif recipe == "abf":
        base = env.get("ROPE_BASE") or "5000000"
        rope = abf_rope(base)
    elif recipe == "abf_multistage":
        if stage is None or not 1 <= stage <= len(ABF_STAGES):
            raise UsageError(f"abf_multistage needs --stage 1..{len(ABF_STAGES)}")
        settings = abf_stage_settings(settings, stage, settings.save, _whole(env, "STAGE_TOKENS", STAGE_TOKENS))
        base = flag_value(ABF_STAGES[stage - 1][0])
        rope = abf_rope(base)
    elif recipe == "pi":
        rope = pi_rope(shape, env.get("PI_FACTOR") or "32")
    else:
        rope = yarn_rope(shape, env.get("YARN_SCALE") or "32")
    return Launch(model, shape, settings, rope, placeholders, base)


def shell_lines(launch: Launch) -> list[str]:
    """The resolved settings the launch script reports and checks, then ``ARGS=( ... )``, for ``eval``."""
    s = launch.settings
    values = dict(MODEL=launch.model, NNODES=s.nnodes, GPUS_PER_NODE=s.gpus_per_node, TP=s.tp, PP=s.pp, CP=s.cp,
                  SEQ_LENGTH=s.seq_length, MBS=s.micro_batch_size, GBS=s.batch, TRAIN_ITERS=s.iterations,
                  SAVE=s.save, LOAD=s.load, MOCK_DATA=int(s.mock_data), DATA_PATH=" ".join(s.data_path),
                  TOKENIZER_MODEL=s.tokenizer_model)
    if launch.rope_base is not None:
        values["ROPE_BASE"] = launch.rope_base
    lines = [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    return lines + ["ARGS=( " + shlex.join(launch.flags) + " )"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_harpe.recipes",
        usage="%(prog)s [options] RECIPE [-- HARPE_FLAG ...]",
        description="A recipe's pretrain_harpe.py flags for the settings in the environment (MODEL, TP, PP, CP, "
                    "SEQ_LENGTH, ...: examples/llama2_common.sh), one per line. After --, harpe's --harpe-* flags "
                    "that choose the bases (default: HARPE_ARGS, else the shape's).")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--stage", type=int, help="abf_multistage: the stage, 1..3")
    p.add_argument("--stages", action="store_true", help="abf_multistage: print the number of stages and exit")
    p.add_argument("--part", choices=("all", "base", "rope"), default="all",
                   help="base: the shape, batch, optimiser and layout every recipe shares; rope: the recipe's RoPE")
    p.add_argument("--placeholders", action="store_true",
                   help="<DATA_PATH> and <TOKENIZER_MODEL> where unset (a dry run's command)")
    p.add_argument("--shell", action="store_true",
                   help="the resolved settings and ARGS=( ... ) of the whole command, for eval")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bases = argv[argv.index("--") + 1:] if "--" in argv else None
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    def body() -> None:
        if args.stages:
            print(len(ABF_STAGES))
            return
        launch = from_env(args.recipe, os.environ, stage=args.stage, bases=bases,
                          placeholders=args.placeholders)
        if args.shell:
            print("\n".join(shell_lines(launch)))
            return
        flags = {"all": launch.flags, "base": base_flags(launch.shape, launch.settings), "rope": launch.rope}
        print("\n".join(flags[args.part]))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
