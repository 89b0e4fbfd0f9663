"""megatron_harpe/recipes.py: each recipe's flags, the settings from the environment, and the launch scripts' and the
planner's commands built from them (examples/*.sh ask the recipes; their --dry-run prints what the functions give)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest

from megatron_harpe import recipes
from megatron_harpe.command import UsageError
from megatron_harpe.recipes import Settings
from megatron_harpe.shape import SHAPES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, *args, **env):
    """The pretrain_harpe.py flags of each command the script's --dry-run prints (without the trainer's check)."""
    full_env = {k: v for k, v in os.environ.items() if k not in recipes.ENV_NAMES and not k.startswith("HARPE_")}
    full_env.update(HARPE_SKIP_CHECK="1", ATTENTION_BACKEND="flash", **env)
    proc = subprocess.run([os.path.join(REPO, "examples", script), "--dry-run", *args], capture_output=True,
                          text=True, env=full_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line]
    return [c[next(i for i, a in enumerate(c) if a.endswith("pretrain_harpe.py")) + 1:] for c in commands]


GPU_7B = Settings(tp=4, cp=2, attention_backend="flash")


def test_the_7b_harpe_script_prints_the_harpe_recipe():
    (flags,) = dry_run("pretrain_llama2_harpe.sh", MOCK_DATA="1")
    assert flags == recipes.harpe(SHAPES["7b"], replace(GPU_7B, mock_data=True))
    assert flags[-2:] == ["--harpe-bases", "paper-llama2-7b"]  # Table 2, one base per 7B head


def test_the_70b_script_searches_its_bases_and_keeps_the_placeholders():
    (flags,) = dry_run("pretrain_llama2_70b_harpe.sh")
    settings = Settings(nnodes=16, tp=8, pp=4, cp=4, attention_backend="flash", save="checkpoints/llama2-70b-harpe")
    assert flags == recipes.harpe(SHAPES["70b"], settings, placeholders=True)
    assert "<DATA_PATH>" in flags and "--group-query-attention" in flags and "peak_valley" in flags


def test_baselines_and_their_settings():
    env = dict(DATA_PATH="0.3 a 0.7 b", TOKENIZER_MODEL="tok.model", TP="8", RECOMPUTE="block",
               RECOMPUTE_NUM_LAYERS="3", EXTRA_ARGS="--eval-iters 7")
    settings = Settings(tp=8, cp=2, recompute="block", recompute_num_layers=3, attention_backend="flash",
                        data_path=("0.3", "a", "0.7", "b"), tokenizer_model="tok.model", extra_args=("--eval-iters", "7"))
    shape = SHAPES["7b"]
    assert dry_run("pretrain_llama2_abf.sh", ROPE_BASE="1e7", **env) == [
        recipes.abf(shape, replace(settings, save="checkpoints/llama2-7b-abf"), "1e7")]
    assert dry_run("pretrain_llama2_pi.sh", **env) == [
        recipes.pi(shape, replace(settings, save="checkpoints/llama2-7b-pi"))]
    (yarn,) = dry_run("pretrain_llama2_yarn.sh", YARN_SCALE="8", **env)
    assert yarn == recipes.yarn(shape, replace(settings, save="checkpoints/llama2-7b-yarn"), "8")
    assert yarn[-6:] == ["--rotary-scaling-factor", "8", "--yarn-original-max-position-embeddings", "4096",
                         "--eval-iters", "7"]  # EXTRA_ARGS last


def test_the_multistage_script_prints_the_three_stages():
    stages = dry_run("pretrain_llama2_abf_multistage.sh", "--", "--lr", "1e-4", MOCK_DATA="1", SAVE="ckpt/ms",
                     LOAD="ckpt/hf")
    expected = recipes.abf_multistage(SHAPES["7b"], replace(GPU_7B, mock_data=True, load="ckpt/hf"), "ckpt/ms")
    assert stages == [stage + ["--lr", "1e-4"] for stage in expected]
    assert [s[s.index("--load") + 1] for s in stages] == ["ckpt/ms/stage1", "ckpt/ms/stage2", "ckpt/ms/stage3"]
    assert [s[s.index("--pretrained-checkpoint") + 1] for s in stages] == ["ckpt/hf", "ckpt/ms/stage1",
                                                                            "ckpt/ms/stage2"]


def test_the_tiny_cpu_script_is_the_harpe_recipe_on_the_local_spec(tmp_path):
    (flags,) = dry_run("pretrain_tiny_harpe_cpu.sh", str(tmp_path / "run"))
    bases = ["--harpe-strategy", "peak_valley", "--harpe-base-min", "1e4", "--harpe-base-max", "1e6",
             "--harpe-stride", "1e4", "--harpe-engine", "compact", "--harpe-metrics-file",
             str(tmp_path / "run" / "metrics.jsonl")]
    settings = Settings(gpus_per_node=2, tp=2, seq_length=256, micro_batch_size=2, global_batch_size=8,
                        train_iters=40, lr="1e-3", warmup_iters=4, save_interval=20, eval_interval=20, eval_iters=2,
                        log_interval=5, cpu=True, save=str(tmp_path / "run" / "checkpoints"), mock_data=True,
                        vocab_size=255)
    assert flags == recipes.harpe(SHAPES["tiny"], settings, bases)
    assert "--bf16" not in flags and flags[flags.index("--transformer-impl") + 1] == "local"


# --- the settings --------------------------------------------------------------------------------------------------

def test_batch_and_iterations_follow_the_tokens():
    s = Settings.from_env({"SEQ_LENGTH": "65536", "TRAIN_TOKENS": "1000000000"})
    assert (s.batch, s.iterations) == (64, -(-1_000_000_000 // (64 * 65536)))
    paper = Settings.from_env({})
    assert paper.batch * paper.seq_length == recipes.TOKENS_PER_STEP
    assert 0 <= paper.iterations * recipes.TOKENS_PER_STEP - recipes.TRAIN_TOKENS < recipes.TOKENS_PER_STEP
    assert Settings.from_env({"GBS": "33", "TRAIN_ITERS": "5"}).batch == 33
    assert (Settings.from_env({}, "70b").world_size, Settings.from_env({}, "13b").tp) == (128, 8)


def test_each_stage_keeps_the_tokens_per_step():
    stages = [recipes.abf_stage_settings(Settings(global_batch_size=7), n, "r") for n in (1, 2, 3)]
    assert [(s.seq_length, s.batch * s.seq_length) for s in stages] == [
        (32768, recipes.TOKENS_PER_STEP), (65536, recipes.TOKENS_PER_STEP), (131072, recipes.TOKENS_PER_STEP)]


@pytest.mark.parametrize("env, message", [
    ({"RECOMPUTE": "bad"}, "RECOMPUTE=bad: choose full, block, selective or none"),
    ({"MODEL": "7x"}, "unknown MODEL '7x': choose 7b, 13b, 70b or tiny"),
    ({"TP": "four"}, "TP=four: give a whole number"),
    ({"SEQ_LENGTH": "0"}, "SEQ_LENGTH=0"),
])
def test_bad_settings_are_usage_errors(env, message, capsys):
    with pytest.raises(UsageError, match=re.escape(message)):
        recipes.from_env("harpe", env)
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        assert recipes.main(["harpe"]) == 2
    assert message in capsys.readouterr().err


def test_the_launch_scripts_pass_every_setting_the_recipes_read():
    with open(os.path.join(REPO, "examples", "llama2_common.sh")) as f:
        names = re.search(r"^HARPE_SETTINGS=\(([^)]*)\)", f.read(), re.M).group(1).split()
    assert names == list(recipes.ENV_NAMES)


def test_the_cli_imports_neither_torch_nor_megatron():
    code = ("import sys, runpy; sys.argv = ['recipes', 'pi']\n"
            "try:\n    runpy.run_module('megatron_harpe.recipes', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]" and "--rotary-seq-len-interpolation-factor" in done.stdout


# --- the planner's parse --------------------------------------------------------------------------------------------

def test_a_failing_planner_parse_leaves_the_caller_as_it_was(monkeypatch):
    """planning.launch.megatron_args parses the recipe's flags in this process: a refused layout (3 does not divide
    32 heads) raises, and WORLD_SIZE, RANK and sys.argv are what they were."""
    from megatron_harpe.planning.launch import megatron_args

    monkeypatch.setattr(sys, "argv", ["caller", "--its-own"])
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(Exception, match="32 attention heads do not divide by --tensor-model-parallel-size 3"):
        megatron_args({"MODEL": "7b", "NNODES": "1", "GPUS_PER_NODE": "8", "TP": "3"})
    assert sys.argv == ["caller", "--its-own"] and os.environ["RANK"] == "5" and "WORLD_SIZE" not in os.environ
