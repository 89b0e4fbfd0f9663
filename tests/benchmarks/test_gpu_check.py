"""benchmarks/gpu_check.sh on a CPU: its commands pass Megatron's parser, it refuses what it must, and its table is
right for logs in Megatron's exact format (a fake ``python`` stands in for the GPU steps end to end)."""

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
PYTHON = os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(
    os.path.join(REPO, ".venv", "bin", "python")) else sys.executable


def load_report():
    spec = importlib.util.spec_from_file_location("gpu_check_report",
                                                  os.path.join(REPO, "benchmarks", "gpu_check_report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = load_report()


def run_script(*args, env=None, timeout=120):
    full_env = dict(os.environ, PYTHON=PYTHON, **(env or {}))
    if "ATTENTION_BACKEND" not in (env or {}):
        full_env.pop("ATTENTION_BACKEND", None)
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def dry_run_commands(out, **env):
    proc = run_script("--dry-run", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def script_args(command, script="pretrain_harpe.py"):
    index = next(i for i, a in enumerate(command) if a.endswith(script))
    return command[:index], command[index + 1:]


ROPE_FLAG_PREFIXES = ("--harpe-", "--rotary-", "--position-embedding-type")


def without_rope_flags(argv):
    rest, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a.startswith(ROPE_FLAG_PREFIXES)
        if not skip:
            rest.append(a)
    return rest


# --- the script ----------------------------------------------------------------------------------------------------

def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_pretrain_commands_pass_megatron_and_differ_only_in_rope(tmp_path, monkeypatch):
    from megatron_harpe.training.entry import parse_and_validate

    out = tmp_path / "check"
    commands = dry_run_commands(out)
    assert not out.exists()  # a dry run creates nothing
    pretrain = [c for c in commands if any(a.endswith("pretrain_harpe.py") for a in c)]
    assert len(pretrain) == 2, commands
    (launcher_h, harpe_argv), (launcher_s, standard_argv) = map(script_args, pretrain)
    flash = subprocess.run([PYTHON, "-c", "import importlib.util as u; print(any(u.find_spec(m) for m in "
                            "('flash_attn', 'flash_attn_interface', 'flash_attn_3')))"], capture_output=True, text=True)
    expected = "flash" if flash.stdout.strip() == "True" else "auto"  # TE's flash backend needs flash-attn
    assert harpe_argv[harpe_argv.index("--attention-backend") + 1] == expected
    assert launcher_h == launcher_s and "--nproc-per-node" in launcher_h
    assert launcher_h[launcher_h.index("--nproc-per-node") + 1] == "1"

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # parse_and_validate replaces sys.argv
    harpe, standard = parse_and_validate(harpe_argv), parse_and_validate(standard_argv)
    for args in (harpe, standard):
        assert args.seq_length == args.max_position_embeddings == 32768
        assert args.train_iters == 20 and args.log_interval == 1
        assert args.transformer_impl == "transformer_engine" and args.bf16
        assert args.attention_backend.name in ("flash", "auto")  # auto where flash-attn is not installed
        assert args.mock_data and args.tokenizer_type == "NullTokenizer"
        assert args.save is None and args.eval_iters == 0
        assert args.log_memory_interval and args.train_iters % args.log_memory_interval == 0
        assert args.position_embedding_type == "rope"
    assert harpe.num_query_groups == 8 and len(harpe.harpe_bases) == 8  # one base per query group
    assert min(harpe.harpe_bases) == 1e6 and max(harpe.harpe_bases) == 5e6
    assert standard.harpe_bases is None and standard.rotary_base == 5_000_000
    assert not any(a.startswith("--harpe-") for a in standard_argv)
    assert without_rope_flags(harpe_argv) == without_rope_flags(standard_argv)
    assert harpe_argv != standard_argv


def test_the_planner_step_estimates_the_harpe_run(tmp_path, monkeypatch):
    """The planner command describes the HARPE pretrain run exactly: same shape, batch, layout, optimizer."""
    from megatron_harpe.planning.megatron_reference import plan_inputs
    from megatron_harpe.planning.memory import estimate_memory
    from megatron_harpe.training.entry import parse_and_validate

    out = tmp_path / "check"
    commands = dry_run_commands(out)
    harpe_argv = script_args(next(c for c in commands if "--harpe-strategy" in c))[1]
    planner = next(c for c in commands if any("plan_parallelism.py" in a for a in c))
    out.mkdir()
    script = planner[planner.index("-c") + 1]
    with open(SCRIPT) as f:
        model = re.search(r"^PLANNER_MODEL='([^']*)'", f.read(), re.M).group(1)
    (out / "small_llama.json").write_text(model)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads((out / "planner.json").read_text())["plans"][0]

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    shape, layout, seq = plan_inputs(parse_and_validate(harpe_argv))
    assert vars(layout) == plan["layout"]
    assert estimate_memory(shape, layout, seq).total == pytest.approx(plan["memory_bytes"]["total"], rel=1e-12)


def test_attention_backend_is_a_setting(tmp_path):
    commands = dry_run_commands(tmp_path / "check", ATTENTION_BACKEND="flash")
    pretrain = [script_args(c)[1] for c in commands if any(a.endswith("pretrain_harpe.py") for a in c)]
    assert [argv[argv.index("--attention-backend") + 1] for argv in pretrain] == ["flash", "flash"]


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path):
    out = tmp_path / "check"
    commands = dry_run_commands(out)
    text = [" ".join(c) for c in commands]
    assert "gpu_check_report.py env" in text[0] and f"gpu_check_report.py table {out}" in text[-1]
    assert any("-m pytest -m gpu" in t for t in text)
    rope = next(c for c in commands if any(a.endswith("benchmarks/rope.py") for a in c))
    _, rope_argv = script_args(rope, "benchmarks/rope.py")
    assert rope_argv[rope_argv.index("--json") + 1] == str(out / "rope.json")
    assert rope_argv[rope_argv.index("--device") + 1] == "cuda"
    # the flags exist in rope.py's parser
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--json" in proc.stdout
    for flag in (a for a in rope_argv if a.startswith("--")):
        assert flag in proc.stdout
    limits = [int(c[3]) for c in commands if c[0] == "timeout"]
    assert len(limits) == 6 and sum(limits) < 8 * 60  # the environment check and the five steps


def test_without_a_gpu_exits_2_and_creates_nothing(tmp_path):
    out = tmp_path / "check"
    proc = run_script(str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU visible" in proc.stderr
    assert not out.exists()


def test_refuses_a_non_empty_out_dir_without_force(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    (out / "keep").write_text("mine")
    proc = run_script("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "--force" in proc.stderr
    # --force without a GPU: still the GPU error, and nothing replaced
    proc = run_script(str(out), "--force", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr
    assert (out / "keep").read_text() == "mine"
    # never the repository itself
    proc = run_script("--out", REPO, "--force", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "repository" in proc.stderr


def test_usage_errors():
    assert run_script("--bogus").returncode == 2
    assert run_script("a", "b").returncode == 2
    proc = run_script("--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


# --- Megatron's log formats ----------------------------------------------------------------------------------------

def megatron_source(relative):
    spec = importlib.util.find_spec("megatron.core")
    root = os.path.dirname(os.path.dirname(spec.origin))
    with open(os.path.join(root, relative)) as f:
        return f.read()


def test_megatron_still_logs_the_formats_parsed():
    training = megatron_source("training/training.py")
    for fragment in ("' iteration {:8d}/{:8d} |'", "' elapsed time per iteration (ms): {:.1f} |'",
                     "f' throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |'", "' {}: {:.6E} |'",
                     "f'(after {iteration} iterations)'"):
        assert fragment in training, fragment
    utils = megatron_source("training/utils/common_utils.py")
    for fragment in ("string = name + ' memory (MB)'", 'f" | allocated: {', 'f" | max allocated: {',
                     'f" | reserved: {', 'f" | max reserved: {', '"[Rank {}] {}"'):
        assert fragment in utils, fragment
    assert "Theoretical memory footprints: weight and optimizer=" in megatron_source(
        "training/theoretical_memory_usage.py")


def iteration_line(iteration, train_iters, ms, loss, tflops=250.0, batch=2):
    """training_log's line, built with its format strings (megatron-core 0.19.2)."""
    log_string = f" [{datetime(2026, 11, 29, 12, 0, iteration).strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    log_string += ' iteration {:8d}/{:8d} |'.format(iteration, train_iters)
    log_string += ' consumed samples: {:12d} |'.format(iteration * batch)
    log_string += ' elapsed time per iteration (ms): {:.1f} |'.format(ms)
    log_string += f' throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |'
    log_string += f' learning rate: {2e-5:.6E} |'
    log_string += f' global batch size: {batch:5d} |'
    log_string += ' {}: {:.6E} |'.format("lm loss", loss)
    log_string += f' loss scale: {1.0:.1f} |'
    log_string += f' grad norm: {3.217:.3f} |'
    log_string += ' number of skipped iterations: {:3d} |'.format(0)
    log_string += ' number of nan iterations: {:3d} |'.format(0)
    return log_string


def memory_line(iteration, allocated, max_allocated, reserved, max_reserved):
    """report_memory's line (MB)."""
    string = f'(after {iteration} iterations)' + ' memory (MB)'
    string += f" | allocated: {allocated:.2f}"
    string += f" | max allocated: {max_allocated:.2f}"
    string += f" | reserved: {reserved:.2f}"
    string += f" | max reserved: {max_reserved:.2f}"
    return "[Rank {}] {}".format(0, string)


def megatron_log(train_iters=20, stop_at=None, ms=1000.0, peak=36000.0, loss_start=10.4, loss_step=0.1):
    lines = ["using world size: 1, data-parallel size: 1", "> building train, validation, and test datasets ..."]
    for i in range(1, (stop_at or train_iters) + 1):
        lines.append(iteration_line(i, train_iters, 9000.0 if i == 1 else ms + (i % 3), loss_start - loss_step * i))
        if i == 1:
            lines.append("Theoretical memory footprints: weight and optimizer=8583.21 MB, activation=20480.00 MB, "
                         "total=29063.21 MB\n")
        if i in (1, 2, 10, 20):
            lines.append(memory_line(i, 9000.0, peak * min(i, 2) / 2, 40000.0, 41000.0 + i))
        lines.append("[after training is done] datetime: 2026-11-29 12:00:30 " if i == train_iters else
                     "    forward-backward ...................................: (990.12, 990.12)")
    return "\n".join(lines) + "\n"


def test_parse_megatron_log():
    run = report.parse_megatron_log(megatron_log())
    assert run["train_iters"] == run["last_iteration"] == 20
    assert run["median_ms"] == 1001.0  # iterations 6..20 of 1000 + (i % 3); iteration 1's 9 s left out
    assert run["median_tflops"] == 250.0
    assert run["loss_first"] == pytest.approx(10.3) and run["loss_last"] == pytest.approx(8.4)
    assert run["peak_allocated_mib"] == 36000.0 and run["peak_reserved_mib"] == 41020.0
    assert run["theoretical_mib"] == {"weight_and_optimizer": 8583.21, "activation": 20480.0, "total": 29063.21}


def test_parse_pytest_summaries():
    assert report.parse_pytest("..\n2 passed, 150 deselected in 61.20s (0:01:01)\n") == {"passed": 2,
                                                                                        "deselected": 150}
    assert report.parse_pytest("==== 1 failed, 1 passed, 1 error, 3 warnings in 9.1s ====") == {
        "failed": 1, "passed": 1, "errors": 1, "warnings": 3}
    assert report.parse_pytest("1 skipped, 25 deselected in 2.38s") == {"skipped": 1, "deselected": 25}
    assert report.parse_pytest("collecting ... killed") is None


def test_last_error_finds_the_root_cause_under_torchrun():
    log = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "pretrain_harpe.py", line 14, in <module>
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.
E1129 12:00:00.000000 123 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1)
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
"""
    assert report.last_error(log).startswith("[rank0]: torch.OutOfMemoryError: CUDA out of memory")
    assert report.last_error("pretrain_harpe.py: error: give either --harpe-bases or --harpe-strategy\n") \
        .startswith("pretrain_harpe.py: error: give either")
    assert report.last_error("") == "(empty log)"


# --- the table -----------------------------------------------------------------------------------------------------

GPU_ROPE_JSON = {
    "device": "NVIDIA H200", "kernel": "triton", "heads": 32, "head_dim": 128,
    "rows": [{"seq": 32768, "dtype": "bf16", "saved harpe/std": 0.004, "saved unfused-per-head/std": 32.0,
              "time harpe/std": 0.42, "time harpe/TE": 1.05, "GB/s": 3600.0, "of peak": 0.75,
              "saved MiB (harpe, std, per-head)": [0.13, 32.0, 1024.0], "ms (harpe, std)": [0.3, 0.7],
              "ms": {"harpe": 0.3, "standard": 0.7, "unfused_per_head": 2.0, "te_fused_standard": 0.286}},
             {"seq": 131072, "dtype": "bf16", "saved harpe/std": 0.001, "saved unfused-per-head/std": 32.0,
              "time harpe/std": 0.40, "time harpe/TE": 1.25, "GB/s": 3000.0, "of peak": 0.625,
              "saved MiB (harpe, std, per-head)": [0.5, 128.0, 4096.0], "ms (harpe, std)": [1.2, 3.0],
              "ms": {"harpe": 1.2, "standard": 3.0, "unfused_per_head": 8.0, "te_fused_standard": 0.96}}],
    "model_step": {"ratio": 1.004, "seconds": {"harpe": 0.0251, "standard": 0.0250}},
}


def write_outdir(out, steps, logs, rope_json=GPU_ROPE_JSON):
    out.mkdir(exist_ok=True)
    (out / "env.txt").write_text("gpu:                NVIDIA H200, 140 GiB\n")
    with open(out / "steps.tsv", "w") as f:
        for step in steps:
            f.write("\t".join(map(str, step)) + "\n")
    for name, text in logs.items():
        (out / name).write_text(text)
    if rope_json is not None:
        (out / "rope.json").write_text(json.dumps(rope_json))


def table(out):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check_report.py"), "table", str(out)],
                          capture_output=True, text=True, timeout=60)
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    return proc, rows


def test_table_all_pass(tmp_path):
    out = tmp_path / "check"
    write_outdir(out, [
        ("pytest", "gpu tests (pytest -m gpu)", 0, 70, 140, "pytest_gpu.log", ""),
        ("rope", "rope benchmark", 0, 45, 90, "rope.log", "rope.json"),
        ("pretrain:harpe", "pretrain HARPE", 0, 60, 90, "pretrain_harpe.log", ""),
        ("pretrain:standard", "pretrain standard RoPE", 0, 58, 90, "pretrain_standard.log", ""),
    ], {"pytest_gpu.log": "..\n2 passed, 150 deselected in 61.20s (0:01:01)\n", "rope.log": "done\n",
        "pretrain_harpe.log": megatron_log(ms=1010.0, peak=36500.0),
        "pretrain_standard.log": megatron_log(ms=1000.0, peak=36000.0)})
    proc, rows = table(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and proc.stdout.lstrip().startswith("| check | status |")
    assert {r["status"] for r in rows.values()} == {"PASS"}
    assert "2 passed, 0 failed" in rows["gpu tests (pytest -m gpu)"]["numbers"]
    assert "HARPE/TE fused 1.05x (met <= 1.10)" in rows["rope s=32768 bf16"]["numbers"]
    assert "HARPE/TE fused 1.25x (MISSED <= 1.10)" in rows["rope s=131072 bf16"]["numbers"]
    assert "62% of peak (MISSED >= 70%)" in rows["rope s=131072 bf16"]["numbers"]
    assert "HarpeGPTModel/GPTModel 1.004" in rows["rope model step"]["numbers"]
    harpe = rows["pretrain HARPE"]
    assert "1011 ms/iter" in harpe["numbers"] and "peak allocated 35.6 GiB" in harpe["numbers"]
    assert "loss 10.300 @1 -> 8.400 @20" in harpe["numbers"] and "Megatron's estimate 28.4 GiB" in harpe["numbers"]
    ratio = rows["pretrain HARPE / standard"]["data"]
    assert ratio["time_ratio"] == pytest.approx(1011 / 1001)
    assert ratio["peak_allocated_ratio"] == pytest.approx(36500 / 36000)
    summary = (out / "summary.md").read_text()
    assert "NVIDIA H200" in summary and "| pretrain HARPE | PASS |" in summary


def test_table_reports_each_failure_as_a_row(tmp_path):
    out = tmp_path / "check"
    crashed = megatron_log(stop_at=3) + ("[rank0]: Traceback (most recent call last):\n"
                                         "[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n"
                                         "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    write_outdir(out, [
        ("pytest", "gpu tests (pytest -m gpu)", 1, 80, 140, "pytest_gpu.log", ""),
        ("rope", "rope benchmark", 124, 90, 90, "rope.log", "rope.json"),
        ("pretrain:harpe", "pretrain HARPE", 1, 30, 90, "pretrain_harpe.log", ""),
        ("pretrain:standard", "pretrain standard RoPE", 0, 58, 90, "pretrain_standard.log", ""),
        ("generic", "later check", -1, 0, 60, "later.log", ""),
    ], {"pytest_gpu.log": "F.\nFAILED tests/kernels/test_triton_rope.py::test_triton_kernel_matches_torch_kernel_on_gpu"
                          " - AssertionError: bad\n1 failed, 1 passed, 150 deselected in 61.20s\n",
        "rope.log": "  s=32768 bf16: done\n",
        "pretrain_harpe.log": crashed,
        "pretrain_standard.log": megatron_log(loss_step=-0.01)},
        rope_json=dict(GPU_ROPE_JSON, rows=GPU_ROPE_JSON["rows"][:1], model_step=None))
    proc, rows = table(out)
    assert proc.returncode == 1
    assert "FAILED:" in proc.stdout
    assert rows["gpu tests (pytest -m gpu)"]["status"] == "FAIL"
    assert "test_triton_kernel_matches_torch_kernel_on_gpu" in rows["gpu tests (pytest -m gpu)"]["numbers"]
    assert rows["rope s=32768 bf16"]["status"] == "PASS"  # measured before the time ran out
    assert "rope model step" not in rows
    assert rows["rope benchmark"]["status"] == "FAIL" and "timed out after 90 s" in rows["rope benchmark"]["numbers"]
    harpe = rows["pretrain HARPE"]
    assert harpe["status"] == "FAIL" and "CUDA out of memory" in harpe["numbers"]
    assert "iteration 3/20" in harpe["numbers"]
    standard = rows["pretrain standard RoPE"]
    assert standard["status"] == "FAIL" and "loss did not fall" in standard["numbers"]
    assert rows["pretrain HARPE / standard"]["status"] == "FAIL"  # HARPE stopped before iteration 6
    assert rows["later check"]["status"] == "SKIP"


def test_table_without_results(tmp_path):
    out = tmp_path / "check"
    write_outdir(out, [("rope", "rope benchmark", 1, 5, 90, "rope.log", "rope.json"),
                       ("pretrain:harpe", "pretrain HARPE", 124, 90, 90, "pretrain_harpe.log", "")],
                 {"rope.log": "ModuleNotFoundError: No module named 'triton'\n", "pretrain_harpe.log": ""},
                 rope_json=None)
    proc, rows = table(out)
    assert proc.returncode == 1
    assert "No module named 'triton'" in rows["rope benchmark"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == "FAIL" and "timed out after 90 s" in rows["pretrain HARPE"]["numbers"]
    assert rows["pretrain HARPE / standard"]["status"] == "FAIL"


def test_rope_json_from_the_real_benchmark(tmp_path):
    """benchmarks/rope.py --json (on the CPU: no TE) gives rows the table reads."""
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--device", "cpu", "--seq", "64",
                           "--dtypes", "fp32", "--repeats", "1", "--skip-model", "--json", str(tmp_path / "rope.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| s | dtype |" in proc.stdout  # the printed table is still there
    result = json.loads((tmp_path / "rope.json").read_text())
    assert result["model_step"] is None and [(r["seq"], r["dtype"]) for r in result["rows"]] == [(64, "fp32")]
    (tmp_path / "rope.log").write_text(proc.stdout)
    (tmp_path / "steps.tsv").write_text("rope\trope benchmark\t0\t9\t90\trope.log\trope.json\n")
    rows = report.build_rows(str(tmp_path))
    assert [(r.check, r.status) for r in rows] == [("rope s=64 fp32", "PASS")]
    assert "HARPE/TE fused n/a (no TE)" in rows[0].numbers


# --- the whole script, GPU steps faked -----------------------------------------------------------------------------

def fake_python(tmp_path, rope_sleep=0, standard_fails=False):
    """A 'python' that answers each GPU step of gpu_check.sh with what the real one would print."""
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    (fixtures / "pytest.log").write_text("..\n2 passed, 150 deselected in 61.20s (0:01:01)\n")
    (fixtures / "rope.json").write_text(json.dumps(GPU_ROPE_JSON))
    (fixtures / "harpe.log").write_text(megatron_log(ms=1010.0, peak=36500.0))
    (fixtures / "standard.log").write_text(megatron_log(stop_at=4) + "[rank0]: RuntimeError: boom\n"
                                           if standard_fails else megatron_log())
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case " $* " in
  *" benchmarks/gpu_check_report.py env "*) echo "gpu:                Fake H200, 140 GiB"; exit 0 ;;
  *" benchmarks/gpu_check_report.py table "*) exec {shlex.quote(sys.executable)} "$@" ;;
  *" -m pytest -m gpu "*) cat {fixtures}/pytest.log ;;
  *" tools/plan_parallelism.py "*) exec {shlex.quote(PYTHON)} "$@" ;;
  *" benchmarks/rope.py "*)
    sleep {rope_sleep}
    while (( $# )); do [[ $1 == --json ]] && cp {fixtures}/rope.json "$2"; shift; done
    echo "rope done" ;;
  *" --harpe-strategy "*) [[ $CUDA_DEVICE_MAX_CONNECTIONS == 1 ]] || exit 9; cat {fixtures}/harpe.log ;;
  *" pretrain_harpe.py "*) cat {fixtures}/standard.log; {"exit 1" if standard_fails else ":"} ;;
  *) echo "fake python: unexpected $*" >&2; exit 3 ;;
esac
""")
    fake.chmod(0o755)
    return str(fake)


def test_whole_script_with_fake_gpu_steps(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=fake_python(tmp_path, standard_fails=True)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Fake H200" in proc.stdout and "Fake H200" in (out / "env.txt").read_text()
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["gpu tests (pytest -m gpu)"]["status"] == "PASS"
    assert rows["rope s=32768 bf16"]["status"] == "PASS"
    assert rows["pretrain HARPE"]["status"] == "PASS"
    assert rows["pretrain standard RoPE"]["status"] == "FAIL" and "RuntimeError: boom" in rows[
        "pretrain standard RoPE"]["numbers"]
    planner = rows["planner estimate / measured"]
    assert planner["data"]["measured_mib"] == 36500.0
    assert planner["status"] == ("PASS" if 0.8 <= planner["data"]["ratio"] <= 1.25 else "FAIL")
    for log in ("pytest_gpu.log", "rope.log", "pretrain_harpe.log", "pretrain_standard.log"):
        assert (out / log).stat().st_size > 0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("FAILED: pretrain standard RoPE")
    # a second run refuses the directory
    again = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHON=str(tmp_path / "python")))
    assert again.returncode == 2 and "--force" in again.stderr


def test_a_step_past_its_limit_is_a_fail_row_and_the_rest_still_run(tmp_path):
    out = tmp_path / "check"
    start = time.monotonic()
    proc = subprocess.run([SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=fake_python(tmp_path, rope_sleep=60), TIMEOUT_ROPE="2"))
    assert time.monotonic() - start < 45
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["rope benchmark"]["status"] == "FAIL" and "timed out after 2 s" in rows["rope benchmark"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == rows["pretrain standard RoPE"]["status"] == "PASS"


def test_interrupt_stops_the_step_skips_the_rest_and_prints_the_table(tmp_path):
    out = tmp_path / "check"
    stdout = tmp_path / "stdout"
    with open(stdout, "w") as f:
        proc = subprocess.Popen([SCRIPT, str(out)], stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHON=fake_python(tmp_path, rope_sleep=60)))
    try:
        deadline = time.monotonic() + 60
        while "--- rope benchmark" not in stdout.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 130, stdout.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["gpu tests (pytest -m gpu)"]["status"] == "PASS"
    assert rows["rope benchmark"]["status"] == "FAIL" and "interrupted" in rows["rope benchmark"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == rows["pretrain standard RoPE"]["status"] == "SKIP"
    assert "| check | status |" in stdout.read_text()
