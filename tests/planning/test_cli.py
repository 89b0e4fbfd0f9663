"""tools/plan_parallelism.py: known configurations, the emitted settings through the real launch script, errors."""

import json
import os
import subprocess
import sys

import pytest

from megatron_harpe.planning.cli import main
from megatron_harpe.planning.launch import megatron_args
from megatron_harpe.planning.megatron_reference import plan_inputs
from megatron_harpe.planning.memory import estimate_memory
from megatron_harpe.planning.search import Hardware, Request, search
from megatron_harpe.shape import SHAPES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plan_parallelism.py")


def plans_for(model, gpus, memory=80, seq=131072, **kw):
    return search(Request(SHAPES[model], seq, gpus, 1, max(1, 4194304 // seq), **kw), Hardware(memory))[0]


@pytest.mark.parametrize("model,gpus,default", [("7b", 8, (4, 1, 2)), ("13b", 16, (8, 1, 2)), ("70b", 128, (8, 4, 4))])
def test_the_examples_default_layouts_fit_80gb_gpus(model, gpus, default):
    """examples/llama2_common.sh's layouts (full recompute) fit; the planner finds something at least as fast."""
    plans = plans_for(model, gpus, recompute="full")
    by_layout = {(p.layout.tp, p.layout.pp, p.layout.cp): p for p in plans}
    assert by_layout[default].fits and by_layout[default].layout.dp == 1
    best = plans_for(model, gpus)[0]
    assert best.fits and best.step_seconds <= by_layout[default].step_seconds


def test_short_sequences_need_no_recompute_and_70b_needs_more_than_a_node():
    best = plans_for("7b", 8, seq=4096)[0]
    assert best.fits and best.layout.recompute == "none"
    assert not any(p.fits for p in plans_for("70b", 8))            # 69B x (2 + 4) bytes alone exceed 8 x 72 GiB / 8


def test_no_fit_exits_1_and_says_what_to_change(capsys):
    assert main(["--model", "70b", "--gpus", "8", "--gpu-memory", "80"]) == 1
    err = capsys.readouterr().err
    assert "no layout fits" in err and "add GPUs" in err and "GiB usable" in err


@pytest.mark.parametrize("argv,message", [
    (["--model", "7x"], "choose 7b, 13b, 70b or the path"),
    (["--model", "7b", "--gpus", "12"], "not a whole number of 8-GPU nodes"),
    (["--model", "7b", "--recompute-layers", "3"], "--recompute-layers goes with --recompute block"),
    (["--model", "7b", "--headroom", "1.5"], "--headroom is a fraction"),
    (["--model", "7b", "--seq-length", "0"], "--seq-length must be at least 1"),
    (["--model", "7b", "--tp", "3"], "no TP x PP x CP x DP layout of 8 GPUs is valid"),
    (["--model", "7b", "--pp", "2", "--recompute", "block", "--recompute-layers", "20"],
     "--recompute-layers 20 exceeds the 16 layers of a stage"),
])
def test_bad_input_exits_2(argv, message, capsys):
    argv = argv + [a for a in ("--gpus", "8") if "--gpus" not in argv] + ["--gpu-memory", "80"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_json_lists_fitting_plans_fastest_first(capsys):
    assert main(["--model", "13b", "--gpus", "16", "--gpu-memory", "80", "--json", "--top", "50"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert len(plans) > 5 and all(p["fits"] for p in plans)
    times = [p["step_seconds"] for p in plans]
    assert times == sorted(times)
    for p in plans:
        mem = p["memory_bytes"]
        assert mem["total"] <= 80 * 0.9 * 2 ** 30
        assert p["layout"]["tp"] * p["layout"]["pp"] * p["layout"]["cp"] * p["layout"]["dp"] == 16


def test_emitted_settings_launch_the_planned_run(capsys):
    """--emit-env -> examples/pretrain_llama2_harpe.sh --dry-run -> Megatron's parser gives back the same plan."""
    argv = ["--model", "70b", "--gpus", "128", "--gpu-memory", "80"]
    assert main(argv + ["--json", "--top", "3"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    for k, plan in enumerate(plans, 1):
        assert main(argv + ["--emit-env", str(k)]) == 0
        lines = capsys.readouterr().out.splitlines()
        env = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
        args = megatron_args(env)
        assert args.world_size == 128 and args.num_query_groups == 8
        shape, layout, seq = plan_inputs(args)
        assert vars(layout) == plan["layout"]
        assert estimate_memory(shape, layout, seq).total == pytest.approx(plan["memory_bytes"]["total"], rel=1e-12)


def test_emit_env_through_the_shell_and_a_custom_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
                                  "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000}))
    script = (f'set -e; eval "$({sys.executable} {TOOL} --model {config} --gpus 8 --gpu-memory 80 --seq-length 65536 '
              f'--emit-env)"; {REPO}/examples/pretrain_llama2_harpe.sh --dry-run')
    env = dict(os.environ, DATA_PATH="data/mixture", TOKENIZER_MODEL="tok.model")
    # the dry run checks the command with the trainer's checks (megatron's import: minutes on a busy CPU)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    command = done.stdout.split()
    # The custom shape goes in after the 7B preset's flags; Megatron keeps the last value.
    assert command[len(command) - 1 - command[::-1].index("--num-layers") + 1] == "24"
    assert "--group-query-attention" in command and "65536" in command
    # its 4 query groups get 4 searched bases, not the 7B script's 32 of Table 2 (the check refused those)
    assert command[len(command) - 1 - command[::-1].index("--harpe-strategy") + 1] == "peak_valley"


# --- issue 15: --emit-env under eval ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code", [
    (["--model", "70b", "--gpus", "8", "--gpu-memory", "80"], 1),          # nothing fits
    (["--model", "7b", "--gpus", "8", "--gpu-memory", "80", "--tp", "3"], 2),  # no valid layout
    (["--model", "7b", "--gpus", "8"], 2),                                  # argparse: --gpu-memory missing
    (["--model", "7b", "--gpus", "8", "--gpu-memory", "80", "--emit-env", "99"], 2),
])
def test_emit_env_failures_print_false_for_eval(argv, code, capsys):
    """eval of an empty output succeeds: on an error --emit-env prints `false`, so that eval (and set -e) fail."""
    if "--emit-env" not in argv:
        argv = argv + ["--emit-env"]
    assert main(argv) == code
    out = capsys.readouterr()
    assert out.out == "false\n" and "error: " in out.err


def test_emitted_plan_is_scoped_to_its_model(capsys):
    assert main(["--model", "7b", "--gpus", "8", "--gpu-memory", "80", "--emit-env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("unset ${HARPE_PLAN_VARS:-}")  # the previous plan's variables go first
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    assert env["HARPE_PLAN_MODEL"] == env["MODEL"] == "7b"
    assert env["HARPE_PLAN_VARS"].strip("'").split() == [*env]


def test_a_plan_applies_to_its_model_and_a_new_plan_replaces_the_old(tmp_path):
    """A custom shape's EXTRA_ARGS from an earlier plan does not leak into the next plan's launch."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
                                  "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000}))
    plan = f"{sys.executable} {TOOL} --gpus 8 --gpu-memory 80 --emit-env"
    script = (f'set -e; eval "$({plan} --model {config})"; eval "$({plan} --model 7b --tp 2)"; '
              f'echo "EXTRA_ARGS=${{EXTRA_ARGS-unset}}"; {REPO}/examples/pretrain_llama2_harpe.sh --dry-run')
    env = dict(os.environ, DATA_PATH="data/mixture", TOKENIZER_MODEL="tok.model", ATTENTION_BACKEND="flash")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "EXTRA_ARGS=unset" in done.stdout
    command = done.stdout.splitlines()[-1].split()
    assert command[command.index("--tensor-model-parallel-size") + 1] == "2"
    assert command[command.index("--num-layers") + 1] == "32" and command.count("--num-layers") == 1


def test_help_imports_neither_megatron_nor_torch():
    code = ("import runpy, sys; sys.argv = ['plan_parallelism.py', '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0] and " + repr(TOOL) + ", run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]" and "--emit-env" in done.stdout
