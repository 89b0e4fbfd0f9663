"""A plan as the environment variables ``examples/llama2_common.sh`` reads, and back through Megatron's parser."""

from __future__ import annotations

import argparse
import os
import shlex

from megatron_harpe import recipes
from megatron_harpe.megatron_args import parse_megatron_args
from megatron_harpe.planning.memory import Layout
from megatron_harpe.shape import SHAPES, LlamaShape

UNIFORM_HARPE_ARGS = "--harpe-strategy uniform --harpe-base-min 1e6 --harpe-base-max 5e6"
SEARCH_HARPE_ARGS = " ".join(recipes.SEARCHED_BASES)


def shape_flags(shape: LlamaShape) -> list[str]:
    """Megatron-LM flags for a shape that is not one of the examples' presets (its head width always said)."""
    flags = shape.to_megatron_flags()
    if "--kv-channels" not in flags:  # where to_megatron_flags puts it: right after --num-attention-heads
        at = flags.index("--num-attention-heads") + 2
        flags[at:at] = ["--kv-channels", str(shape.kv_channels)]
    return flags


def launch_env(shape: LlamaShape, layout: Layout, seq_length: int, global_batch_size: int,
               gpus_per_node: int) -> dict[str, str]:
    """The settings of ``examples/pretrain_llama2_*.sh`` that run this layout.

    A shape that is not a preset goes in as ``MODEL=7b`` with its own shape flags in ``EXTRA_ARGS`` (Megatron's
    parser keeps the last value of a repeated flag) and the bases searched for its query groups in ``HARPE_ARGS``.
    """
    gpus = layout.gpus
    env = {
        "MODEL": shape.name if shape.name in SHAPES and SHAPES[shape.name] == shape else "7b",
        "NNODES": str(max(1, gpus // gpus_per_node)),
        "GPUS_PER_NODE": str(min(gpus, gpus_per_node)),
        "TP": str(layout.tp), "PP": str(layout.pp), "CP": str(layout.cp),
        "SEQ_LENGTH": str(seq_length),
        "MBS": str(layout.micro_batch_size), "GBS": str(global_batch_size),
        "RECOMPUTE": layout.recompute,
    }
    if layout.recompute == "block":
        env["RECOMPUTE_NUM_LAYERS"] = str(layout.recompute_layers)
    if env["MODEL"] != shape.name:
        env["EXTRA_ARGS"] = " ".join(shape_flags(shape))
        # the 7B script's default bases are Table 2's 32, one per 7B head: another shape searches its own
        env["HARPE_ARGS"] = SEARCH_HARPE_ARGS
    return env


PLAN_MODEL, PLAN_VARS = "HARPE_PLAN_MODEL", "HARPE_PLAN_VARS"


def format_env(env: dict[str, str], distributed_optimizer: bool = True) -> str:
    """Shell lines for ``eval``: the previous plan's variables unset, then this plan's, scoped to its model.

    ``HARPE_PLAN_MODEL`` names the model the layout was planned for: examples/llama2_common.sh refuses it for a
    launch of another model. ``HARPE_PLAN_VARS`` lists what was exported, so the next plan (or the user) unsets it.
    """
    env = {**env, PLAN_MODEL: env["MODEL"]}
    env[PLAN_VARS] = " ".join([*env, PLAN_VARS])
    lines = [f"unset ${{{PLAN_VARS}:-}}  # the previous plan's settings"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if not distributed_optimizer:
        lines.append("# the examples always use --use-distributed-optimizer; this plan assumed it off")
    return "\n".join(lines)


def launch_flags(env: dict[str, str]) -> tuple[list[str], int]:
    """The ``pretrain_harpe.py`` flags ``examples/pretrain_llama2_harpe.sh --dry-run`` prints for ``env`` (the
    recipe in Python, placeholders for the data), and the job's world size."""
    # The caller's own plan variables are not this one's.
    inherited = {k: v for k, v in os.environ.items() if k not in (PLAN_MODEL, PLAN_VARS)}
    full_env = {**inherited, "DATA_PATH": "data/mixture", "TOKENIZER_MODEL": "tokenizer.model", **env}
    launch = recipes.from_env("harpe", full_env)
    return launch.flags, launch.settings.world_size


def megatron_args(env: dict[str, str]) -> argparse.Namespace:
    """Megatron's parsed and validated arguments for the run ``env`` launches (world size = its GPUs).

    Unless ``env`` sets ``HARPE_ARGS``, the bases are a uniform list: they do not change memory or layout, and
    the examples' default peak-valley search (13B, 70B) would take seconds per parse.
    """
    flags, world_size = launch_flags({"HARPE_ARGS": UNIFORM_HARPE_ARGS, **env})
    return parse_megatron_args(flags, world_size=world_size)
