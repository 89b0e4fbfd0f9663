"""The compact engine on the CPU through the real entry (examples/pretrain_tiny_harpe_cpu.sh -> pretrain_harpe.py).

TP=2 and PP=2 runs whose loss falls; CP=2 on a weighted two-prefix blend equal to CP=1; megatron's rerun state
machine stopping a run on a rejected loss; a run killed with SIGKILL and resumed from its torch_dist checkpoint
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
from megatron_harpe.model import have_te

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "pretrain_tiny_harpe_cpu.sh")
# The launch script's pre-flight check (pretrain_harpe.py --harpe-check-only, tested in test_launch_scripts.py) is
# one more megatron import per launch; the trainer runs the same checks itself.
QUICK = dict(TRAIN_ITERS="12", LOG_INTERVAL="1", EVAL_INTERVAL="12", EVAL_ITERS="1", SAVE_INTERVAL="100",
             EXTRA_ARGS="--distributed-timeout-minutes 3", HARPE_SKIP_CHECK="1")
ONE_RANK = dict(NPROC="1", TP="1", LAUNCHER="python")
# A hang guard, not a speed limit: a loaded 2-core machine takes minutes to import megatron in every rank.
HANG_GUARD_S = 1800


def launch(out, *extra, **env):
    full_env = dict(os.environ, **QUICK)
    full_env["MASTER_PORT"] = str(free_port())  # not this process's own process-group port
    full_env.update(env)
    full_env.setdefault("PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
    return subprocess.Popen([SCRIPT, str(out), *extra], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=HANG_GUARD_S):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out):
    """iteration -> last logged training loss (a resumed run logs some iterations twice)."""
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["iteration"]: r["lm loss"] for r in records if r.get("split") != "valid"}


def assert_loss_falls(curve, iterations):
    values = [curve[i] for i in sorted(curve)]
    assert len(values) == iterations and all(math.isfinite(v) for v in values)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.3, values


# The TP=2 run is also the checkpoint test_checkpoint_loads_into_harpe_model_with_its_bases rebuilds: long and fast
# enough (20 iterations at 3e-3) for its loss check on the loaded model.
TP2_ITERS = 20


@pytest.fixture(scope="module")
def tp2_and_pp2_runs(tmp_path_factory):
    """``(tp2_dir, pp2_dir)``: a TP=2 and a PP=2 run, both on two ranks, side by side."""
    root = tmp_path_factory.mktemp("parallel")
    tp = launch(root / "tp2", NPROC="2", TP="2", PP="1", TRAIN_ITERS=str(TP2_ITERS), LR="3e-3")
    pp = launch(root / "pp2", NPROC="2", TP="1", PP="2")
    finish(tp), finish(pp)
    return root / "tp2", root / "pp2"


@pytest.mark.multirank
def test_tp2_and_pp2_losses_fall(tp2_and_pp2_runs):
    tp2, pp2 = tp2_and_pp2_runs
    assert_loss_falls(losses(tp2), TP2_ITERS)
    assert_loss_falls(losses(pp2), 12)
    assert (tp2 / "checkpoints" / f"iter_{TP2_ITERS:07d}").is_dir()


@pytest.mark.multirank
def test_cp2_trains_exactly_like_one_rank(tmp_path, two_indexed_datasets):
    """Megatron's CP batch slicing, HARPE positions on each CP rank and the CP loss reduction, end to end, on a
    weighted blend ``--data-path 0.6 A 0.4 B`` (BlendedDataset adds a 1-D dataset_id to every sample, which the
    batch drops as pretrain_gpt.py does): CP 2 equals CP 1, and TP 2 x CP 2 equals TP 2 x CP 1."""
    a, b, tokenizer = two_indexed_datasets
    blend = dict(DATA_PATH=f"0.6 {a} 0.4 {b}", TOKENIZER_MODEL=tokenizer, SPLIT="90,10,0", TRAIN_ITERS="4",
                 WARMUP_ITERS="1", EVAL_ITERS="1", EVAL_INTERVAL="4", SEQ_LENGTH="128")
    runs = {}
    for tp in (1, 2):  # two at a time on two cores
        for cp in (1, 2):
            runs[tp, cp] = launch(tmp_path / f"tp{tp}cp{cp}", NPROC=str(tp * cp), TP=str(tp), CP=str(cp), **blend)
        for cp in (1, 2):
            finish(runs[tp, cp])
    for tp in (1, 2):
        one, two = losses(tmp_path / f"tp{tp}cp1"), losses(tmp_path / f"tp{tp}cp2")
        assert sorted(one) == sorted(two) == [1, 2, 3, 4]
        for i in one:
            assert two[i] == pytest.approx(one[i], rel=1e-5, abs=0), (tp, one, two)


def test_rerun_state_machine_checks_the_loss(tmp_path):
    """megatron's --rerun-mode validate_results (the default) in the compact loop: an injected reproducible error
    is re-run in place, then the run saves a checkpoint at the last good iteration and exits 16 (megatron's
    EXIT_CODE_RESUME_TO_DISAMBIGUATE), as megatron.training does."""
    proc = launch(tmp_path / "run", **ONE_RANK, TRAIN_ITERS="4", WARMUP_ITERS="1", EVAL_ITERS="0",
                  EXTRA_ARGS="--error-injection-rate 1 --error-injection-type persistent_error")
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 16, out[-3000:]
    assert "Need to rerun step to check reproducibility" in out and "Saving a checkpoint and exiting now" in out
    done = max(losses(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(done)


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "run" / "checkpoints" / "keep"
    marker.write_text("mine")
    proc = subprocess.run([SCRIPT, str(tmp_path / "run")], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert marker.read_text() == "mine"


def test_kill_and_resume_reproduces_losses_exactly(tmp_path):
    # torchrun, as on a cluster: with LAUNCHER=python the resumed losses differ from the reference at ~1e-4
    common = dict(NPROC="1", TP="1", TRAIN_ITERS="8", EVAL_ITERS="0",
                  EXTRA_ARGS="--hidden-dropout 0.1 --distributed-timeout-minutes 3")
    finish(launch(tmp_path / "straight", **common))
    reference = losses(tmp_path / "straight")

    run = tmp_path / "killed"
    proc = launch(run, SAVE_INTERVAL="4", **common)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and proc.poll() is None:  # kill once iteration 6 is done (checkpoint at 4)
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


def test_checkpoint_loads_into_harpe_model_with_its_bases(tp2_and_pp2_runs, megatron_single_process):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import MockGPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_harpe import HarpeGPTModel
    from megatron_harpe.checkpoint_layout import load_checkpoint_args
    from megatron_harpe.checkpoint_model import load_model
    from megatron_harpe.training.data import gpt_dataset_config_from_args

    ckpt = tp2_and_pp2_runs[0] / "checkpoints"  # TP=2, 20 iterations at 3e-3
    # the tiny script's search: 2 groups, head_dim 16, over --seq-length 256
    expected = select_bases(2, "peak_valley", 1e4, 1e6, head_dim=16, target_length=256, stride=1e4)
    # torch_dist's .metadata is a pickle: opted in, the checkpoint is this test's own run
    assert load_checkpoint_args(str(ckpt), allow_pickle=True).harpe_bases == expected

    # --use-checkpoint-args fills the shape from the checkpoint (megatron's load_args_from_checkpoint), and the bases
    from megatron_harpe.megatron_args import parse_megatron_args

    resumed = parse_megatron_args(["--use-checkpoint-args", "--load", str(ckpt), "--micro-batch-size", "1",
                                  "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
                                  "NullTokenizer", "--vocab-size", "255"])
    assert (resumed.num_layers, resumed.hidden_size, resumed.num_query_groups) == (2, 64, 2)
    assert resumed.harpe_bases == expected

    model, args = load_model(str(ckpt), allow_pickle=True)  # saved at TP=2, loaded at TP=1 (torch_dist reshards)
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


LOCAL_ON_GPU = "--transformer-impl local --no-rope-fusion --no-gradient-accumulation-fusion --no-persist-layer-norm"


@pytest.mark.gpu
@pytest.mark.parametrize("spec, flags", [
    pytest.param("transformer_engine", "--transformer-impl transformer_engine",
                 marks=pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")),
    ("local", LOCAL_ON_GPU),
])
def test_megatron_engine_on_one_gpu(tmp_path, spec, flags):
    """megatron.training.pretrain, the same entry and flags on a GPU: the spec it says it built, the Triton kernel."""
    out = finish(launch(tmp_path / "gpu", NPROC="1", TP="1", TRAIN_ITERS="3", EVAL_ITERS="0",
                        EXTRA_ARGS=f"--harpe-engine megatron {flags} --bf16"))
    assert "iteration        3/       3" in out and "HARPE bases (2" in out
    assert f"layer spec: {spec} " in out and "HARPE RoPE kernel: triton" in out
