"""The compact engine on the CPU through the real entry (examples/pretrain_tiny_harpe_cpu.sh -> pretrain_harpe.py).

TP=2 and PP=2 runs whose loss falls; a run killed with SIGKILL and resumed from its torch_dist checkpoint
reproduces the uninterrupted run's losses exactly (hidden dropout on, so the RNG state must come back too);
the checkpoint rebuilds a HarpeGPTModel with the bases it was trained with, at another TP size.
"""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from megatron_harpe.bases import select_bases
from megatron_harpe.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "pretrain_tiny_harpe_cpu.sh")
QUICK = dict(TRAIN_ITERS="12", LOG_INTERVAL="1", EVAL_INTERVAL="12", EVAL_ITERS="1", SAVE_INTERVAL="100",
             EXTRA_ARGS="--distributed-timeout-minutes 3")


def launch(out, *extra, **env):
    full_env = dict(os.environ, **QUICK)
    full_env["MASTER_PORT"] = str(free_port())  # not this process's own process-group port
    full_env.update(env)
    full_env.setdefault("PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
    return subprocess.Popen([SCRIPT, str(out), *extra], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=420):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out):
    """iteration -> last logged training loss (a resumed run logs some iterations twice)."""
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["iteration"]: r["lm loss"] for r in records if r.get("split") != "valid"}


def assert_loss_falls(curve):
    values = [curve[i] for i in sorted(curve)]
    assert len(values) == 12 and all(math.isfinite(v) for v in values)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.3, values


@pytest.mark.multirank
def test_tp2_and_pp2_losses_fall(tmp_path):
    tp = launch(tmp_path / "tp2", NPROC="2", TP="2", PP="1")
    pp = launch(tmp_path / "pp2", NPROC="2", TP="1", PP="2")
    finish(tp), finish(pp)
    assert_loss_falls(losses(tmp_path / "tp2"))
    assert_loss_falls(losses(tmp_path / "pp2"))
    assert (tmp_path / "tp2" / "checkpoints" / "iter_0000012").is_dir()


@pytest.mark.multirank
def test_cp2_trains_exactly_like_one_rank(tmp_path):
    """Megatron's CP batch slicing, HARPE positions on each CP rank and the CP loss reduction, end to end."""
    quick = dict(TRAIN_ITERS="5", WARMUP_ITERS="2", EVAL_ITERS="0", SEQ_LENGTH="128")
    one = launch(tmp_path / "cp1", NPROC="1", TP="1", **quick)
    two = launch(tmp_path / "cp2", NPROC="2", TP="1", CP="2", **quick)
    finish(one), finish(two)
    cp1, cp2 = losses(tmp_path / "cp1"), losses(tmp_path / "cp2")
    assert sorted(cp1) == sorted(cp2) == [1, 2, 3, 4, 5]
    for i in cp1:
        assert cp2[i] == pytest.approx(cp1[i], rel=1e-5, abs=0), (cp1, cp2)


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "run" / "checkpoints" / "keep"
    marker.write_text("mine")
    proc = subprocess.run([SCRIPT, str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert marker.read_text() == "mine"


def test_kill_and_resume_reproduces_losses_exactly(tmp_path):
    common = dict(NPROC="1", TP="1", TRAIN_ITERS="8", EVAL_ITERS="0",
                  EXTRA_ARGS="--hidden-dropout 0.1 --distributed-timeout-minutes 3")
    finish(launch(tmp_path / "straight", **common))
    reference = losses(tmp_path / "straight")

    run = tmp_path / "killed"
    proc = launch(run, SAVE_INTERVAL="4", **common)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once iteration 6 is done (checkpoint at 4)
        if metrics.exists() and 6 in losses(run):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[0][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    finish(launch(run, RESUME="1", SAVE_INTERVAL="4", **common))
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == reference  # bit-for-bit: iterations 5..8 recomputed after the resume


def test_checkpoint_loads_into_harpe_model_with_its_bases(tmp_path, megatron_single_process):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import MockGPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_harpe import HarpeGPTModel
    from megatron_harpe.training.checkpoint import load_checkpoint_args, load_model
    from megatron_harpe.training.data import gpt_dataset_config_from_args

    finish(launch(tmp_path / "run", NPROC="2", TP="2", TRAIN_ITERS="20", LR="3e-3"))
    ckpt = tmp_path / "run" / "checkpoints"
    # the tiny script's search: 2 groups, head_dim 16, over --seq-length 256
    expected = select_bases(2, "peak_valley", 1e4, 1e6, head_dim=16, target_length=256, stride=1e4)
    assert load_checkpoint_args(str(ckpt)).harpe_bases == expected

    model, args = load_model(str(ckpt))  # saved at TP=2, loaded at TP=1 (torch_dist reshards)
    assert isinstance(model, HarpeGPTModel) and model.harpe_bases == expected
    inv_freq = model.rotary_pos_emb.inv_freq
    d = args.hidden_size // args.num_attention_heads
    for g, base in enumerate(expected):
        plain = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(inv_freq[g].double(), plain, rtol=1e-6, atol=0)

    # the trained weights came back: the loaded model predicts the (mock) training data far better than chance
    args.tensor_model_parallel_size = 1
    config = gpt_dataset_config_from_args(args, build_tokenizer(args))
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [8, 0, 0], lambda: True, config).build()
    batch = [train[i] for i in range(4)]
    tokens = torch.stack([b["tokens"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    with torch.no_grad():
        loss = model(tokens, None, None, labels=labels).float().mean().item()
    assert loss < 0.75 * math.log(args.padded_vocab_size), loss


@pytest.mark.gpu
def test_megatron_engine_on_one_gpu(tmp_path):
    """megatron.training.pretrain with the Transformer Engine spec: the same entry and flags on a GPU."""
    out = finish(launch(tmp_path / "gpu", NPROC="1", TP="1", TRAIN_ITERS="3", EVAL_ITERS="0",
                        EXTRA_ARGS="--harpe-engine megatron --transformer-impl transformer_engine --bf16"))
    assert "iteration        3/       3" in out and "HARPE bases (2" in out
