"""A plan as the environment variables ``examples/llama2_common.sh`` reads, and back through Megatron's parser."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys

from megatron_harpe.planning.memory import Layout
from megatron_harpe.planning.shapes import PRESETS, ModelShape

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_SCRIPT = os.path.join(REPO, "examples", "pretrain_llama2_harpe.sh")
UNIFORM_HARPE_ARGS = "--harpe-strategy uniform --harpe-base-min 1e6 --harpe-base-max 5e6"
# examples/pretrain_llama2_harpe.sh's default for the shapes Table 2 does not fit (13B, 70B)
SEARCH_HARPE_ARGS = "--harpe-strategy peak_valley --harpe-base-min 1e6 --harpe-base-max 5e6 --harpe-stride 30000"


def shape_flags(shape: ModelShape) -> list[str]:
    """Megatron-LM flags for a shape that is not one of the examples' presets."""
    flags = ["--num-layers", shape.num_layers, "--hidden-size", shape.hidden_size, "--ffn-hidden-size",
             shape.ffn_hidden_size, "--num-attention-heads", shape.num_attention_heads, "--kv-channels",
             shape.kv_channels]
    if shape.num_query_groups != shape.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", shape.num_query_groups]
    return [str(f) for f in flags]


def launch_env(shape: ModelShape, layout: Layout, seq_length: int, global_batch_size: int,
               gpus_per_node: int) -> dict[str, str]:
    """The settings of ``examples/pretrain_llama2_*.sh`` that run this layout.

    A shape that is not a preset goes in as ``MODEL=7b`` with its own shape flags in ``EXTRA_ARGS`` (Megatron's
    parser keeps the last value of a repeated flag) and the bases searched for its query groups in ``HARPE_ARGS``.
    """
    gpus = layout.gpus
    env = {
        "MODEL": shape.name if shape.name in PRESETS and PRESETS[shape.name] == shape else "7b",
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


def launch_command(env: dict[str, str], script: str = LAUNCH_SCRIPT) -> list[str]:
    """The ``pretrain_harpe.py`` arguments the launch script builds for ``env`` (its ``--dry-run``)."""
    placeholders = dict(DATA_PATH="data/mixture", TOKENIZER_MODEL="tokenizer.model")
    # The caller parses the command with the trainer's checks itself (megatron_args); the caller's own plan
    # variables are not this one's.
    inherited = {k: v for k, v in os.environ.items() if k not in (PLAN_MODEL, PLAN_VARS)}
    full_env = {**inherited, **placeholders, "HARPE_SKIP_CHECK": "1", **env}
    done = subprocess.run([script, "--dry-run"], env=full_env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ValueError(f"{os.path.basename(script)} --dry-run failed: {done.stderr.strip()}")
    line = next((ln for ln in done.stdout.splitlines() if "pretrain_harpe.py" in ln), None)
    if line is None:
        raise ValueError(f"{os.path.basename(script)} --dry-run printed no pretrain_harpe.py command")
    command = shlex.split(line)
    return command[next(i for i, a in enumerate(command) if a.endswith("pretrain_harpe.py")) + 1:]


def megatron_args(env: dict[str, str], script: str = LAUNCH_SCRIPT):
    """Megatron's parsed and validated arguments for the run ``env`` launches (world size = its GPUs).

    Unless ``env`` sets ``HARPE_ARGS``, the bases are a uniform list: they do not change memory or layout, and
    the examples' default peak-valley search (13B, 70B) would take seconds per parse.
    """
    from megatron_harpe.training.entry import parse_and_validate

    env = {"HARPE_ARGS": UNIFORM_HARPE_ARGS, **env}
    world = int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    argv = sys.argv
    os.environ.update(WORLD_SIZE=str(world), RANK="0")
    command = launch_command(env, script)
    try:
        with contextlib.redirect_stdout(io.StringIO()):     # validate_args prints every argument
            return parse_and_validate(command)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
