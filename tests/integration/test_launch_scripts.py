"""examples/*.sh: each --dry-run command parses with Megatron-LM's parser (plus --harpe-*) and holds the paper's settings."""

import os
import shlex
import subprocess

import pytest

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_TOKENS_PER_STEP = 4 * 1024 * 1024
PAPER_TOKENS = 6e9


def run_dry(script, *args, **env):
    """The script's --dry-run; ATTENTION_BACKEND=flash unless given (the probe's answer depends on the machine).

    It runs pretrain_harpe.py --harpe-check-only (megatron's import and validate_args): minutes on a busy CPU.
    """
    full_env = dict(os.environ, DATA_PATH="data/mixture", TOKENIZER_MODEL="llama2/tokenizer.model",
                    LOAD="checkpoints/llama2-7b-megatron", ATTENTION_BACKEND="flash")
    for plan_variable in ("HARPE_PLAN_MODEL", "HARPE_PLAN_VARS", "HARPE_SKIP_CHECK"):
        full_env.pop(plan_variable, None)
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset
    return subprocess.run([os.path.join(REPO, "examples", script), "--dry-run", *args], capture_output=True,
                          text=True, env=full_env, timeout=900)


# The flash-attn probe's tests are about the probe: the trainer's check (tested with every script's defaults
# below) is skipped there, so that the fake pythons answer the probe alone.
NO_CHECK = "1"


def dry_run(script, *args, **env):
    proc = run_dry(script, *args, **env)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line]
    assert commands, proc.stdout
    return commands


def parsed(command, monkeypatch):
    """Megatron's parse_args + validate_args + HARPE resolution, for the world torchrun would start."""
    from megatron_harpe.megatron_args import parse_megatron_args

    launcher = command[:command.index(next(a for a in command if a.endswith("pretrain_harpe.py")))]
    nnodes = int(launcher[launcher.index("--nnodes") + 1])
    per_node = int(launcher[launcher.index("--nproc-per-node") + 1])
    monkeypatch.setenv("WORLD_SIZE", str(nnodes * per_node))
    monkeypatch.setenv("RANK", "0")
    args = parse_megatron_args(command[len(launcher) + 1:])
    return args, nnodes * per_node


def check_paper_recipe(args, world, seq_length=131072):
    assert args.seq_length == args.max_position_embeddings == seq_length
    assert (args.lr, args.min_lr, args.lr_decay_style) == (2e-5, 2e-5, "constant")
    assert (args.adam_beta1, args.adam_beta2, args.optimizer) == (0.9, 0.95, "adam")
    assert args.global_batch_size * args.seq_length == PAPER_TOKENS_PER_STEP
    assert 0 <= args.train_iters * PAPER_TOKENS_PER_STEP - PAPER_TOKENS < PAPER_TOKENS_PER_STEP
    assert args.bf16 and args.transformer_impl == "transformer_engine" and args.attention_backend.name == "flash"
    assert args.normalization == "RMSNorm" and args.swiglu and not args.add_bias_linear
    assert args.untie_embeddings_and_output_weights and args.ckpt_format == "torch_dist"
    assert world % (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                    * args.context_parallel_size) == 0
    assert args.recompute_granularity == "full" and args.sequence_parallel
    assert args.pretrained_checkpoint == "checkpoints/llama2-7b-megatron"  # LOAD: fine-tune from the converted model
    assert args.data_path == ["data/mixture"] and args.tokenizer_type == "Llama2Tokenizer"


def test_harpe_7b_uses_table_2(monkeypatch):
    (command,) = dry_run("pretrain_llama2_harpe.sh")
    args, world = parsed(command, monkeypatch)
    check_paper_recipe(args, world)
    assert args.harpe_bases == [float(b) for b in PAPER_LLAMA2_7B_BASES]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (32, 4096, 32)


def test_harpe_peak_valley_alternative(monkeypatch):
    (command,) = dry_run("pretrain_llama2_harpe.sh", HARPE_ARGS="--harpe-strategy uniform")
    args, world = parsed(command, monkeypatch)
    assert len(args.harpe_bases) == 32 and args.harpe_bases[0] == 1e6 and args.harpe_bases[-1] == 5e6


def test_split_is_a_setting(monkeypatch):
    (command,) = dry_run("pretrain_llama2_harpe.sh", SPLIT="90,10,0")
    args, _ = parsed(command, monkeypatch)
    assert args.split == "90,10,0"


@pytest.mark.parametrize("script, shape, groups", [
    ("pretrain_llama2_13b_harpe.sh", (40, 5120, 40), 40),
    ("pretrain_llama2_70b_harpe.sh", (80, 8192, 64), 8),
])
def test_harpe_13b_70b_search_one_base_per_group(script, shape, groups, monkeypatch):
    (command,) = dry_run(script)
    args, world = parsed(command, monkeypatch)
    check_paper_recipe(args, world)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == shape
    assert len(args.harpe_bases) == groups and args.harpe_strategy == "peak_valley"
    assert min(args.harpe_bases) == 1e6 and max(args.harpe_bases) <= 5e6
    assert all(round((b - 1e6) / 3e4, 6).is_integer() for b in args.harpe_bases)  # on the stride-30k grid
    if groups == 8:
        assert args.group_query_attention and args.num_query_groups == 8


def test_single_stage_abf(monkeypatch):
    (command,) = dry_run("pretrain_llama2_abf.sh")
    args, world = parsed(command, monkeypatch)
    check_paper_recipe(args, world)
    assert args.harpe_bases is None and args.rotary_base == 5_000_000 and args.position_embedding_type == "rope"


def test_multi_stage_abf_three_stages(monkeypatch):
    commands = dry_run("pretrain_llama2_abf_multistage.sh", SAVE="ckpt/ms")
    stages = [parsed(c, monkeypatch)[0] for c in commands]
    assert [(a.rotary_base, a.seq_length) for a in stages] == [(1_000_000, 32768), (2_000_000, 65536),
                                                               (5_000_000, 131072)]
    assert [a.global_batch_size * a.seq_length for a in stages] == [PAPER_TOKENS_PER_STEP] * 3
    # each stage starts from the one before; the first from the converted checkpoint
    assert [a.pretrained_checkpoint for a in stages] == ["checkpoints/llama2-7b-megatron", "ckpt/ms/stage1",
                                                         "ckpt/ms/stage2"]
    assert [a.save for a in stages] == ["ckpt/ms/stage1", "ckpt/ms/stage2", "ckpt/ms/stage3"]
    assert all(a.harpe_bases is None for a in stages)


def test_pi_and_yarn_through_megatron_flags(monkeypatch):
    (pi,) = dry_run("pretrain_llama2_pi.sh")
    args, world = parsed(pi, monkeypatch)
    check_paper_recipe(args, world)
    assert args.rotary_seq_len_interpolation_factor == 32 and args.rotary_base == 10000 and args.harpe_bases is None
    (yarn,) = dry_run("pretrain_llama2_yarn.sh")
    args, world = parsed(yarn, monkeypatch)
    check_paper_recipe(args, world)
    assert args.position_embedding_type == "yarn" and args.rotary_scaling_factor == 32
    assert args.yarn_original_max_position_embeddings == 4096 and args.harpe_bases is None


def test_every_setting_is_an_environment_variable(monkeypatch):
    (command,) = dry_run("pretrain_llama2_harpe.sh", NNODES="2", TP="8", CP="2", SEQ_LENGTH="65536",
                         TRAIN_TOKENS="1000000000", EXTRA_ARGS="--eval-iters 7")
    args, world = parsed(command, monkeypatch)
    assert world == 16 and (args.tensor_model_parallel_size, args.context_parallel_size) == (8, 2)
    assert args.seq_length == 65536 and args.global_batch_size == 64 and args.eval_iters == 7
    assert args.train_iters == -(-1_000_000_000 // (64 * 65536))


def test_real_run_without_data_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_MODEL")}
    proc = subprocess.run([os.path.join(REPO, "examples", "pretrain_llama2_harpe.sh")], capture_output=True,
                          text=True, env=dict(env, SAVE=str(tmp_path / "s")), timeout=60)
    assert proc.returncode == 2
    assert "DATA_PATH" in proc.stderr and "TOKENIZER_MODEL" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_slurm_wrapper_runs_the_chosen_script():
    sbatch = open(os.path.join(REPO, "examples", "slurm", "pretrain_llama2.sbatch")).read()
    proc = subprocess.run(["bash", "-n", os.path.join(REPO, "examples", "slurm", "pretrain_llama2.sbatch")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "srun" in sbatch and "NODE_RANK" in sbatch and "MASTER_ADDR" in sbatch


# --- --attention-backend: flash where flash-attn is installed for the python that runs, else auto ----------------

def fake_python(tmp_path, name, has_flash):
    """A python whose flash-attn probe (examples/llama2_common.sh's) answers ``has_flash``; it records each call."""
    fake = tmp_path / name
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path / (name + '.calls')}
[[ "$*" == *flash_attn_interface* ]] && exit {0 if has_flash else 1}
exit 7
""")
    fake.chmod(0o755)
    return str(fake)


def backend(command):
    return command[command.index("--attention-backend") + 1]


def warnings_of(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("warning:")]


def test_without_flash_attn_the_backend_is_auto_with_one_warning(tmp_path):
    python = fake_python(tmp_path, "python", has_flash=False)
    proc = run_dry("pretrain_llama2_harpe.sh", PYTHON=python, ATTENTION_BACKEND=None, TORCHRUN="no-such-torchrun",
                   HARPE_SKIP_CHECK=NO_CHECK)
    assert proc.returncode == 0, proc.stderr
    (command,) = (shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line)
    assert backend(command) == "auto"
    (warning,) = warnings_of(proc)
    assert "flash-attn is not installed for " + python in warning and "--attention-backend auto" in warning
    assert (tmp_path / "python.calls").read_text().count("flash_attn_interface") == 1  # one probe


def test_with_flash_attn_the_backend_is_flash_without_a_warning(tmp_path):
    python = fake_python(tmp_path, "python", has_flash=True)
    proc = run_dry("pretrain_llama2_harpe.sh", PYTHON=python, ATTENTION_BACKEND=None, TORCHRUN="no-such-torchrun",
                   HARPE_SKIP_CHECK=NO_CHECK)
    assert proc.returncode == 0, proc.stderr
    assert backend(shlex.split(proc.stdout.splitlines()[-1])) == "flash" and warnings_of(proc) == []


def test_the_probe_asks_the_python_torchrun_runs(tmp_path):
    """PYTHON has no flash-attn but the interpreter on torchrun's #! line has: that one decides."""
    runs = fake_python(tmp_path, "torchrun-python", has_flash=True)
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(f"#!{runs}\n# torchrun stand-in\n")
    torchrun.chmod(0o755)
    python = fake_python(tmp_path, "python", has_flash=False)
    proc = run_dry("pretrain_llama2_harpe.sh", PYTHON=python, ATTENTION_BACKEND=None, TORCHRUN=str(torchrun),
                   HARPE_SKIP_CHECK=NO_CHECK)
    assert proc.returncode == 0, proc.stderr
    assert backend(shlex.split(proc.stdout.splitlines()[-1])) == "flash" and warnings_of(proc) == []
    assert not (tmp_path / "python.calls").exists()
    # LAUNCHER=python runs PYTHON itself: its answer
    proc = run_dry("pretrain_llama2_harpe.sh", PYTHON=python, ATTENTION_BACKEND=None, TORCHRUN=str(torchrun),
                   LAUNCHER="python", HARPE_SKIP_CHECK=NO_CHECK)
    assert backend(shlex.split(proc.stdout.splitlines()[-1])) == "auto" and len(warnings_of(proc)) == 1


@pytest.mark.parametrize("setting", ["flash", "fused", "unfused", "auto"])
def test_attention_backend_setting_wins_over_the_probe(tmp_path, setting, monkeypatch):
    python = fake_python(tmp_path, "python", has_flash=False)
    proc = run_dry("pretrain_llama2_harpe.sh", PYTHON=python, ATTENTION_BACKEND=setting,
                   TORCHRUN="no-such-torchrun", HARPE_SKIP_CHECK=NO_CHECK)
    assert proc.returncode == 0, proc.stderr
    (command,) = (shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line)
    assert backend(command) == setting and warnings_of(proc) == []
    assert not (tmp_path / "python.calls").exists()  # not even probed
    args, _ = parsed(command, monkeypatch)
    assert args.attention_backend.name == setting


def test_a_bad_attention_backend_is_refused():
    proc = run_dry("pretrain_llama2_harpe.sh", ATTENTION_BACKEND="fastest")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "ATTENTION_BACKEND=fastest: choose flash, fused, unfused, local or auto" in proc.stderr


def test_multistage_probes_once_for_its_three_stages(tmp_path):
    python = fake_python(tmp_path, "python", has_flash=False)
    proc = run_dry("pretrain_llama2_abf_multistage.sh", PYTHON=python, ATTENTION_BACKEND=None,
                   TORCHRUN="no-such-torchrun", HARPE_SKIP_CHECK=NO_CHECK)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line]
    assert [backend(c) for c in commands] == ["auto"] * 3 and len(warnings_of(proc)) == 1


def test_the_tiny_cpu_model_passes_no_attention_backend(tmp_path):
    python = fake_python(tmp_path, "python", has_flash=False)
    proc = run_dry("pretrain_tiny_harpe_cpu.sh", PYTHON=python, ATTENTION_BACKEND=None, DATA_PATH=None,
                   TOKENIZER_MODEL=None, LOAD=None)
    assert proc.returncode == 0, proc.stderr
    assert "--attention-backend" not in proc.stdout and warnings_of(proc) == []


def test_gpu_check_uses_the_same_probe():
    with open(os.path.join(REPO, "benchmarks", "gpu_check.sh")) as f:
        gpu_check = f.read()
    assert 'source "$REPO/examples/llama2_common.sh"' in gpu_check
    assert "harpe_attention_backend" in gpu_check and "flash_attn_interface" not in gpu_check


# --- issue 15: the command line of the launch scripts ----------------------------------------------------------

SCRIPTS = ["pretrain_llama2_harpe.sh", "pretrain_llama2_13b_harpe.sh", "pretrain_llama2_70b_harpe.sh",
           "pretrain_llama2_abf.sh", "pretrain_llama2_abf_multistage.sh", "pretrain_llama2_pi.sh",
           "pretrain_llama2_yarn.sh", "pretrain_tiny_harpe_cpu.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_script_answers_help_and_launches_nothing(script, flag, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_MODEL")}
    proc = subprocess.run([os.path.join(REPO, "examples", script), flag], capture_output=True, text=True,
                          env=dict(env, TORCHRUN=str(tmp_path / "must-not-run"), SAVE=str(tmp_path / "s")),
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"usage: {script} " in proc.stdout and "--dry-run" in proc.stdout and "-- FLAG" in proc.stdout
    assert "pretrain_harpe.py --" not in proc.stdout and list(tmp_path.iterdir()) == []
    header = open(os.path.join(REPO, "examples", script)).read().splitlines()[1].lstrip("# ")
    assert proc.stdout.startswith(header)  # the script's own description, not its wrapper's


def test_flags_after_double_dash_reach_megatron_last_and_torchrun_is_the_venvs(monkeypatch):
    """`-- --lr 1e-4` is passed through (Megatron keeps the last value); TORCHRUN unset: the repo's .venv one."""
    (command,) = dry_run("pretrain_llama2_harpe.sh", "--", "--lr", "1e-4", "--eval-iters", "7", TORCHRUN=None)
    assert command[-4:] == ["--lr", "1e-4", "--eval-iters", "7"]
    venv_torchrun = os.path.join(REPO, ".venv", "bin", "torchrun")
    assert command[0] == (venv_torchrun if os.access(venv_torchrun, os.X_OK) else "torchrun")
    args, _ = parsed(command, monkeypatch)
    assert args.lr == 1e-4 and args.eval_iters == 7


def test_a_launch_checks_every_stage_before_the_first_starts(tmp_path):
    """Stage 3 (131072 tokens: GBS 32) does not divide by MBS 8 x DP 8; stages 1 and 2 would have trained first."""
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(f"#!/usr/bin/env bash\ntouch {tmp_path / 'launched'}\n")
    torchrun.chmod(0o755)
    env = dict(os.environ, MOCK_DATA="1", NNODES="8", MBS="8", TORCHRUN=str(torchrun), ATTENTION_BACKEND="flash",
               PYTHON=os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(
                   os.path.join(REPO, ".venv", "bin", "python")) else "python", SAVE=str(tmp_path / "ms"))
    proc = subprocess.run([os.path.join(REPO, "examples", "pretrain_llama2_abf_multistage.sh")], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--global-batch-size 32 does not divide by --micro-batch-size 8 x data parallel 8" in proc.stderr
    assert "SEQ_LENGTH=131072" in proc.stderr and "# checking stage 3" in proc.stderr
    assert not (tmp_path / "launched").exists() and not (tmp_path / "ms").exists()
