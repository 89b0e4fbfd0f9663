"""examples/*.sh: each --dry-run command parses with Megatron-LM's parser (plus --harpe-*) and holds the paper's settings."""

import os
import shlex
import subprocess

import pytest

from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_TOKENS_PER_STEP = 4 * 1024 * 1024
PAPER_TOKENS = 6e9


def dry_run(script, **env):
    full_env = dict(os.environ, DATA_PATH="data/mixture", TOKENIZER_MODEL="llama2/tokenizer.model",
                    LOAD="checkpoints/llama2-7b-megatron", **env)
    proc = subprocess.run([os.path.join(REPO, "examples", script), "--dry-run"], capture_output=True, text=True,
                          env=full_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "pretrain_harpe.py" in line]
    assert commands, proc.stdout
    return commands


def parsed(command, monkeypatch):
    """Megatron's parse_args + validate_args + HARPE resolution, for the world torchrun would start."""
    from megatron_harpe.training.entry import parse_and_validate

    launcher = command[:command.index(next(a for a in command if a.endswith("pretrain_harpe.py")))]
    nnodes = int(launcher[launcher.index("--nnodes") + 1])
    per_node = int(launcher[launcher.index("--nproc-per-node") + 1])
    monkeypatch.setenv("WORLD_SIZE", str(nnodes * per_node))
    monkeypatch.setenv("RANK", "0")
    args = parse_and_validate(command[len(launcher) + 1:])
    return args, nnodes * per_node


def check_paper_recipe(args, world, seq_length=131072):
    assert args.seq_length == args.max_position_embeddings == seq_length
    assert (args.lr, args.min_lr, args.lr_decay_style) == (2e-5, 2e-5, "constant")
    assert (args.adam_beta1, args.adam_beta2, args.optimizer) == (0.9, 0.95, "adam")
    assert args.global_batch_size * args.seq_length == PAPER_TOKENS_PER_STEP
    assert 0 <= args.train_iters * PAPER_TOKENS_PER_STEP - PAPER_TOKENS < PAPER_TOKENS_PER_STEP
    assert args.bf16 and args.transformer_impl == "transformer_engine"
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
