"""benchmarks/gpu_check.sh (and gpu_wheels.sh) on a CPU: its commands pass Megatron's parser and build the models they
name, it refuses what it must, it installs the wheels a bare GPU machine lacks, and its table is right for logs in
Megatron's exact format and for the spec / RoPE-kernel lines pretrain_harpe.py prints (a fake ``python`` stands in
for the GPU steps end to end)."""

import functools
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
# A hang guard, not a speed limit: on a loaded 2-core machine one megatron import takes a minute.
HANG_GUARD_S = 1800


def load_report():
    spec = importlib.util.spec_from_file_location("gpu_check_report",
                                                  os.path.join(REPO, "benchmarks", "gpu_check_report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = load_report()


# The settings gpu_check.sh reads; a test passes the ones it means (the others are unset, so that the developer's
# environment cannot change what a test sees). No wheels unless a test gives WHEELS_DIR.
SETTINGS = ("ATTENTION_BACKEND", "TRANSFORMER_IMPL", "WHEEL_SITE", "TIMEOUT_WHEELS", "TIMEOUT_ENV", "TIMEOUT_TESTS",
            "TIMEOUT_ROPE", "TIMEOUT_PRETRAIN", "TIMEOUT_PLANNER")


def script_env(env=None, python=PYTHON):
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env.update(PYTHON=python, WHEELS_DIR=os.path.join(REPO, "tests", "no-such-wheels-dir"))
    full_env.update(env or {})
    return full_env


def run_script(*args, env=None, timeout=HANG_GUARD_S, python=PYTHON):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=script_env(env, python),
                          timeout=timeout)


@functools.cache
def probe(code, python=PYTHON):
    """True where ``python -c code`` exits 0 (the probes gpu_check.sh makes)."""
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S).returncode == 0


def have_flash():
    return probe("import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) for m in "
                 "('flash_attn', 'flash_attn_interface', 'flash_attn_3')))")


def have_te():
    return probe("import transformer_engine.pytorch")


def dry_run_commands(out, *args, python=PYTHON, **env):
    proc = run_script("--dry-run", "--out", str(out), *args, env=env, python=python)
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
    from megatron_harpe.megatron_args import parse_megatron_args

    out = tmp_path / "check"
    commands = dry_run_commands(out)
    assert not out.exists()  # a dry run creates nothing
    pretrain = [c for c in commands if any(a.endswith("pretrain_harpe.py") for a in c)]
    assert len(pretrain) == 2, commands
    (launcher_h, harpe_argv), (launcher_s, standard_argv) = map(script_args, pretrain)
    expected = "flash" if have_flash() else "auto"  # TE's flash backend needs flash-attn
    assert harpe_argv[harpe_argv.index("--attention-backend") + 1] == expected
    assert launcher_h == launcher_s and "--nproc-per-node" in launcher_h
    assert launcher_h[launcher_h.index("--nproc-per-node") + 1] == "1"

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    harpe, standard = parse_megatron_args(harpe_argv), parse_megatron_args(standard_argv)
    impl = "transformer_engine" if have_te() else "local"  # the local spec where TE is not importable
    for args in (harpe, standard):
        assert args.seq_length == args.max_position_embeddings == 32768
        assert args.train_iters == 20 and args.log_interval == 1
        assert args.transformer_impl == impl and args.bf16
        if impl == "local":  # these kernels need TE (or apex): off, or megatron refuses to build the model
            assert not args.apply_rope_fusion and not args.gradient_accumulation_fusion and args.no_persist_layer_norm
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
    from megatron_harpe.megatron_args import parse_megatron_args

    out = tmp_path / "check"
    commands = dry_run_commands(out)
    harpe_argv = script_args(next(c for c in commands if "--harpe-strategy" in c))[1]
    planner = next(c for c in commands if any("plan_parallelism.py" in a for a in c))
    out.mkdir()
    script = planner[planner.index("-c") + 1]
    with open(SCRIPT) as f:
        model = re.search(r"^PLANNER_MODEL='([^']*)'", f.read(), re.M).group(1)
    (out / "small_llama.json").write_text(model)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads((out / "planner.json").read_text())["plans"][0]

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    shape, layout, seq = plan_inputs(parse_megatron_args(harpe_argv))
    assert vars(layout) == plan["layout"]
    assert estimate_memory(shape, layout, seq).total == pytest.approx(plan["memory_bytes"]["total"], rel=1e-12)


def pretrain_argvs(commands):
    return [script_args(c)[1] for c in commands if any(a.endswith("pretrain_harpe.py") for a in c)]


def test_attention_backend_is_a_setting(tmp_path):
    commands = dry_run_commands(tmp_path / "check", ATTENTION_BACKEND="flash")
    assert [argv[argv.index("--attention-backend") + 1] for argv in pretrain_argvs(commands)] == ["flash", "flash"]


def test_transformer_impl_is_a_setting_and_both_specs_pass_megatron(tmp_path, monkeypatch):
    """TRANSFORMER_IMPL=transformer_engine: TE's spec with megatron's fusions; local: the local spec without them."""
    from megatron_harpe.megatron_args import parse_megatron_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    te = pretrain_argvs(dry_run_commands(tmp_path / "te", TRANSFORMER_IMPL="transformer_engine"))
    local = pretrain_argvs(dry_run_commands(tmp_path / "local", TRANSFORMER_IMPL="local"))
    for argv in te:
        assert "--no-rope-fusion" not in argv and argv[argv.index("--transformer-impl") + 1] == "transformer_engine"
        args = parse_megatron_args(argv)
        assert args.transformer_impl == "transformer_engine" and args.apply_rope_fusion
    for argv in local:
        args = parse_megatron_args(argv)
        assert args.transformer_impl == "local"
        assert not args.apply_rope_fusion and not args.gradient_accumulation_fusion and args.no_persist_layer_norm
    # and the local spec's model builds from these flags (megatron's own config; its torch norms refuse a
    # persistent layer norm, its linear layers a gradient-accumulation fusion without apex)
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    assert not (config.persist_layer_norm or config.gradient_accumulation_fusion or config.apply_rope_fusion)


def test_the_local_spec_runs_build_and_announce_what_the_report_checks(tmp_path, monkeypatch, capsys,
                                                                      megatron_single_process):
    """The pretrain commands' flags build megatron's local-spec models (shrunk to one small layer), and the lines
    pretrain_harpe.py logs while building them are the ones gpu_check_report.py asserts: spec local, HARPE kernel
    (torch on a CPU, triton on CUDA; printed at its first call), none for standard RoPE."""
    import logging

    import torch
    from megatron.training.arguments import core_transformer_config_from_args

    import megatron_harpe.kernels as kernels
    import megatron_harpe.model_from_args as model_from_args
    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.megatron_args import parse_megatron_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    expected = {}
    for argv in pretrain_argvs(dry_run_commands(tmp_path / "check", "--only", "pretrain", TRANSFORMER_IMPL="local")):
        for flag, value in (("--num-layers", "1"), ("--hidden-size", "256"), ("--ffn-hidden-size", "512")):
            argv[argv.index(flag) + 1] = value
        args = parse_megatron_args(argv)
        args.padded_vocab_size = 1024
        config = core_transformer_config_from_args(args)
        config.use_cpu_initialization = True  # megatron.training would place it on the GPU
        monkeypatch.setattr(model_from_args, "_announced", False)  # it announces once per process
        capsys.readouterr()
        records = []
        handler = logging.Handler(logging.INFO)
        handler.emit = records.append
        logger = logging.getLogger(model_from_args.__name__)
        logger.addHandler(handler)
        monkeypatch.setattr(logger, "level", logging.INFO)
        try:
            model = model_from_args.build_model(args, config=config)
            # the HARPE kernel says which one it is at its first call: one forward step (megatron's own RoPE
            # provider places its table on CUDA unless shimmed)
            monkeypatch.setattr(kernels, "_reported", set(), raising=False)
            with megatron_on_cpu():
                model(torch.randint(0, 1024, (1, 16)), None, None)
        finally:
            logger.removeHandler(handler)
        # printed (as megatron.training reports) or logged: the report reads the step's whole output either way
        said = report.parse_announcements(capsys.readouterr().out + "\n".join(r.getMessage() for r in records))
        assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
        expected[args.harpe_bases is not None] = said
    assert expected[True] == {"spec": ["local"], "kernel": ["torch"]}  # HARPE; triton where CUDA is
    assert expected[False] == {"spec": ["local"], "kernel": []}  # standard RoPE: no HARPE kernel line
    assert report._announcement_problems({"spec": "local", "kernel": "none"}, expected[False], finished=True) == []


def test_only_runs_the_chosen_steps(tmp_path):
    text = [" ".join(c) for c in dry_run_commands(tmp_path / "check", "--only", "rope,pretrain")]
    assert "gpu_check_report.py env" in text[0] and "gpu_check_report.py table" in text[-1]
    assert sum("benchmarks/rope.py" in t for t in text) == 1
    assert sum("pretrain_harpe.py" in t for t in text) == 2
    assert not any("-m pytest" in t or "plan_parallelism.py" in t for t in text)
    text = [" ".join(c) for c in dry_run_commands(tmp_path / "check", "--only=tests")]
    assert len(text) == 3 and "-m pytest -m gpu" in text[1]


@pytest.mark.parametrize("args, env, message", [
    (["--only", "rope,bogus"], {}, "unknown step 'bogus'"),
    (["--only"], {}, "--only needs"),
    ([], {"TRANSFORMER_IMPL": "te"}, "TRANSFORMER_IMPL=te"),
    ([], {"ATTENTION_BACKEND": "fastest"}, "ATTENTION_BACKEND=fastest"),
    ([], {"TIMEOUT_ROPE": "1m"}, "TIMEOUT_"),
])
def test_bad_settings_are_refused(tmp_path, args, env, message):
    proc = run_script("--dry-run", "--out", str(tmp_path / "check"), *args, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stdout == ""


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
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and "--json" in proc.stdout
    for flag in (a for a in rope_argv if a.startswith("--")):
        assert flag in proc.stdout
    assert "--check-kernels" in rope_argv  # the Triton-vs-torch kernel check at 32k and 128k
    assert rope_argv[rope_argv.index("--seq") + 1:rope_argv.index("--seq") + 3] == ["32768", "131072"]
    pytest_command = next(c for c in commands if "pytest" in c)
    assert "-rA" in pytest_command  # every test's outcome, for the 64-bit-offset row
    limits = [int(c[3]) for c in commands if c[0] == "timeout"]
    assert len(limits) == 6 and sum(limits) < 8 * 60  # the environment check and the five steps
    # with the wheels to install (a bare machine), still under 8 minutes in all
    with open(SCRIPT) as f:
        source = f.read()
    assert int(re.search(r"T_WHEELS=\$\{TIMEOUT_WHEELS:-(\d+)\}", source).group(1)) + sum(limits) < 8 * 60


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
    log_string += f' iteration {iteration:8d}/{train_iters:8d} |'
    log_string += f' consumed samples: {iteration * batch:12d} |'
    log_string += f' elapsed time per iteration (ms): {ms:.1f} |'
    log_string += f' throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |'
    log_string += f' learning rate: {2e-5:.6E} |'
    log_string += f' global batch size: {batch:5d} |'
    log_string += ' {}: {:.6E} |'.format("lm loss", loss)
    log_string += f' loss scale: {1.0:.1f} |'
    log_string += f' grad norm: {3.217:.3f} |'
    log_string += f' number of skipped iterations: {0:3d} |'
    log_string += f' number of nan iterations: {0:3d} |'
    return log_string


def memory_line(iteration, allocated, max_allocated, reserved, max_reserved):
    """report_memory's line (MB)."""
    string = f'(after {iteration} iterations)' + ' memory (MB)'
    string += f" | allocated: {allocated:.2f}"
    string += f" | max allocated: {max_allocated:.2f}"
    string += f" | reserved: {reserved:.2f}"
    string += f" | max reserved: {max_reserved:.2f}"
    return f"[Rank {0}] {string}"


SPEC_LOCAL = "layer spec: local (megatron's local layer spec with the torch-SDPA core attention)"
KERNEL_TRITON = "HARPE RoPE kernel: triton (first call, on cuda:0)"
HARPE_PATH = ("HARPE RoPE path: --harpe-rope-impl auto (the kernel that runs prints 'HARPE RoPE kernel: ...' at its "
              "first call)")
STANDARD_PATH = "standard RoPE: megatron's unfused path, base 5e+06"


def megatron_log(train_iters=20, stop_at=None, ms=1000.0, peak=36000.0, loss_start=10.4, loss_step=0.1,
                 announce=(SPEC_LOCAL, HARPE_PATH, KERNEL_TRITON)):
    """A megatron.training log; ``announce``: the lines pretrain_harpe.py logs when it builds the model."""
    lines = ["using world size: 1, data-parallel size: 1", *announce,
             "> building train, validation, and test datasets ..."]
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

def kernel_check(error=1e-3, tolerance=8 * 2.0 ** -9):
    """A row's 'check triton/torch' / 'check liger/std' as benchmarks/rope.py writes it."""
    errors = {name: error for name in ("fwd q", "fwd k", "bwd q", "bwd k")}
    return {"errors": errors, "tolerance": tolerance, "ok": error <= tolerance}


GPU_ROPE_JSON = {
    "device": "NVIDIA H200", "kernel": "triton", "heads": 32, "head_dim": 128,
    "rows": [{"seq": 32768, "dtype": "bf16", "saved harpe/std": 0.004, "saved unfused-per-head/std": 32.0,
              "check triton/torch": kernel_check(), "check liger/std": kernel_check(),
              "time harpe/std": 0.42, "time harpe/TE": 1.05, "time harpe/liger": 0.97, "GB/s": 3600.0,
              "of peak": 0.75,
              "saved MiB (harpe, std, per-head)": [0.13, 32.0, 1024.0], "ms (harpe, std)": [0.3, 0.7],
              "ms": {"harpe": 0.3, "standard": 0.7, "unfused_per_head": 2.0, "te_fused_standard": 0.286,
                     "liger_standard": 0.31}},
             {"seq": 131072, "dtype": "bf16", "saved harpe/std": 0.001, "saved unfused-per-head/std": 32.0,
              "check triton/torch": kernel_check(), "check liger/std": kernel_check(),
              "time harpe/std": 0.40, "time harpe/TE": 1.25, "time harpe/liger": 1.2, "GB/s": 3000.0,
              "of peak": 0.625,
              "saved MiB (harpe, std, per-head)": [0.5, 128.0, 4096.0], "ms (harpe, std)": [1.2, 3.0],
              "ms": {"harpe": 1.2, "standard": 3.0, "unfused_per_head": 8.0, "te_fused_standard": 0.96,
                     "liger_standard": 1.0}}],
    "missing": {},
    "model_step": {"ratio": 1.004, "seconds": {"harpe": 0.0251, "standard": 0.0250}, "impl": "te"},
}
# What the lent H200 gives: no Transformer Engine.
BARE_ROPE_JSON = dict(GPU_ROPE_JSON, missing={"te_fused_standard": "TE not installed"},
                      rows=[{k: v for k, v in r.items() if k != "time harpe/TE"} | {"ms": {
                          k: v for k, v in r["ms"].items() if k != "te_fused_standard"}} for r in GPU_ROPE_JSON["rows"]])

PYTEST_GPU_LOG = """..
PASSED tests/kernels/test_triton_rope.py::test_triton_kernel_matches_torch_kernel_on_gpu
PASSED tests/kernels/test_triton_rope.py::test_triton_offsets_past_2_to_the_31_on_gpu
2 passed, 150 deselected in 61.20s (0:01:01)
"""


HARPE_EXPECT, STANDARD_EXPECT = "spec=local,kernel=triton", "spec=local,kernel=none"


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
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    return proc, rows


def test_table_all_pass(tmp_path):
    out = tmp_path / "check"
    write_outdir(out, [
        ("wheels", "wheels (megatron-core, Liger-Kernel, nltk)", 0, 6, 30, "wheels.log", "", ""),
        ("pytest", "gpu tests (pytest -m gpu)", 0, 70, 140, "pytest_gpu.log", ""),
        ("rope", "rope benchmark", 0, 45, 90, "rope.log", "rope.json"),
        ("pretrain:harpe", "pretrain HARPE", 0, 60, 90, "pretrain_harpe.log", "", HARPE_EXPECT),
        ("pretrain:standard", "pretrain standard RoPE", 0, 58, 90, "pretrain_standard.log", "", STANDARD_EXPECT),
    ], {"wheels.log": "installed 4 wheels into /tmp/site: megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl\n",
        "pytest_gpu.log": PYTEST_GPU_LOG, "rope.log": "done\n",
        "pretrain_harpe.log": megatron_log(ms=1010.0, peak=36500.0),
        "pretrain_standard.log": megatron_log(ms=1000.0, peak=36000.0, announce=(SPEC_LOCAL, STANDARD_PATH))})
    proc, rows = table(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and proc.stdout.lstrip().startswith("| check | status |")
    assert {r["status"] for r in rows.values()} == {"PASS"}
    assert "installed 4 wheels" in rows["wheels (megatron-core, Liger-Kernel, nltk)"]["numbers"]
    assert "2 passed, 0 failed" in rows["gpu tests (pytest -m gpu)"]["numbers"]
    assert rows["rope kernel 64-bit offsets (pytest)"]["numbers"] == "passed: test_triton_offsets_past_2_to_the_31_on_gpu"
    assert "fwd q 1.0e-03, fwd k 1.0e-03, bwd q 1.0e-03, bwd k 1.0e-03 (within 1.6e-02)" in rows["rope kernel s=131072 bf16: Triton vs torch"]["numbers"]
    assert "HARPE/TE fused 1.05x (met <= 1.10)" in rows["rope s=32768 bf16"]["numbers"]
    assert "HARPE/TE fused 1.25x (MISSED <= 1.10)" in rows["rope s=131072 bf16"]["numbers"]
    assert "HARPE/Liger 0.97x (met <= 1.10)" in rows["rope s=32768 bf16"]["numbers"]
    assert "HARPE/Liger 1.20x (MISSED <= 1.10)" in rows["rope s=131072 bf16"]["numbers"]
    assert "ms: HARPE 1.20, Liger 1.00, TE 0.96, std 3.00" in rows["rope s=131072 bf16"]["numbers"]
    assert "62% of peak (MISSED >= 70%)" in rows["rope s=131072 bf16"]["numbers"]
    assert "HarpeGPTModel/GPTModel 1.004" in rows["rope model step"]["numbers"]
    assert not any(check.startswith("rope baseline") for check in rows)  # both baselines ran
    harpe = rows["pretrain HARPE"]
    assert harpe["numbers"].startswith("spec local; HARPE kernel triton; ")
    assert rows["pretrain standard RoPE"]["numbers"].startswith("spec local; 1001 ms/iter")
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
    """benchmarks/rope.py --json (on the CPU: no TE, no Liger) gives rows the table reads."""
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--device", "cpu", "--seq", "64",
                           "--dtypes", "fp32", "--repeats", "1", "--skip-model", "--json", str(tmp_path / "rope.json")],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| s | dtype |" in proc.stdout  # the printed table is still there
    result = json.loads((tmp_path / "rope.json").read_text())
    assert result["model_step"] is None and [(r["seq"], r["dtype"]) for r in result["rows"]] == [(64, "fp32")]
    assert set(result["missing"]) == {"te_fused_standard", "liger_standard"}
    (tmp_path / "rope.log").write_text(proc.stdout)
    (tmp_path / "steps.tsv").write_text("rope\trope benchmark\t0\t9\t90\trope.log\trope.json\n")
    rows = report.build_rows(str(tmp_path))
    assert [(r.check, r.status) for r in rows] == [("rope s=64 fp32", "PASS"), ("rope baseline: TE fused RoPE", "SKIP"),
                                                   ("rope baseline: Liger RoPE", "SKIP")]
    assert "HARPE/unfused std" in rows[0].numbers and "TE" not in rows[0].numbers
    assert rows[1].numbers == "not measured: needs CUDA"


FAKE_LIGER = '''"""Stand-in for liger_kernel.ops.rope (liger-kernel 0.8.5's contract, in torch): q, k are [b, h, s, d] whose
storage is [b, s, h, d]; cos, sin are (1, s, d) = cat(freqs, freqs); q and k are rotated in place."""
import torch

CALLS = []


def _rotate(x, cos, sin, sign):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[..., :half].float()[:, :, None], sign * sin[..., :half].float()[:, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class LigerRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        assert cos.dim() == 3 and cos.shape[0] == 1 and cos.shape[1] == q.shape[2] == k.shape[2], cos.shape
        assert cos.shape[2] == q.shape[3] and cos.dtype == q.dtype, (cos.shape, cos.dtype)
        for t in (q, k):
            physical = t.transpose(1, 2)
            # Liger calls contiguous() on this: an adapter that hands it anything else pays a copy
            assert physical.is_contiguous(), "not Liger's [b, s, h, d] storage"
            physical.copy_(_rotate(physical, cos, sin, 1.0))
        CALLS.append(tuple(q.shape))
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        out = [_rotate(t.transpose(1, 2), cos, sin, -1.0).transpose(1, 2) for t in (dq, dk)]
        return out[0], out[1], None, None, None, None, None
'''


def test_rope_kernel_check_and_liger_baseline_on_the_cpu(tmp_path):
    """--check-kernels runs the Triton kernel (Triton's interpreter on a CPU) against the torch kernel, and the Liger
    baseline is called in Liger's own layout: its output equals megatron's standard RoPE, forward and backward."""
    package = tmp_path / "site" / "liger_kernel"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "rope.py").write_text(FAKE_LIGER)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{tmp_path / 'site'}:{REPO}")
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--device", "cpu", "--seq", "24",
                           "--dtypes", "fp32", "--repeats", "1", "--skip-model", "--check-kernels",
                           "--json", str(tmp_path / "rope.json")], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "rope.json").read_text())["rows"]
    check = row["check triton/torch"]
    assert check["ok"] and set(check["errors"]) == {"fwd q", "fwd k", "bwd q", "bwd k"}
    assert 0 <= max(check["errors"].values()) <= check["tolerance"] == 1e-5
    assert row["check liger/std"]["ok"] and max(row["check liger/std"]["errors"].values()) <= 1e-6
    assert row["time harpe/liger"] > 0 and "liger_standard" in row["ms"] and "liger_standard" in row["saved MiB"]
    assert "| 24 | fp32 |" in proc.stdout
    (tmp_path / "rope.log").write_text(proc.stdout)
    (tmp_path / "steps.tsv").write_text("rope\trope benchmark\t0\t9\t90\trope.log\trope.json\n")
    rows = {r.check: r for r in report.build_rows(str(tmp_path))}
    assert rows["rope kernel s=24 fp32: Triton vs torch"].status == "PASS"
    assert rows["rope s=24 fp32"].status == "PASS" and "HARPE/Liger" in rows["rope s=24 fp32"].numbers
    assert "rope baseline: Liger RoPE" not in rows and rows["rope baseline: TE fused RoPE"].status == "SKIP"


def test_check_kernels_needs_a_triton_device():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--device", "cpu", "--seq", "8",
                           "--check-kernels"], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
    proc = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "rope.py"), "--device", "cpu", "--seq", "0"],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and "positive" in proc.stderr


def test_rope_rows_fail_on_a_kernel_mismatch_and_say_which_baseline_is_missing(tmp_path):
    rows_json = [dict(BARE_ROPE_JSON["rows"][0], **{"check triton/torch": kernel_check(error=0.05)}),
                 dict(BARE_ROPE_JSON["rows"][1], **{"check liger/std": kernel_check(error=float("nan"))})]
    write_outdir(tmp_path, [("rope", "rope benchmark", 0, 45, 90, "rope.log", "rope.json")], {"rope.log": "done\n"},
                 rope_json=dict(BARE_ROPE_JSON, rows=rows_json))
    proc, rows = table(tmp_path)
    assert proc.returncode == 1
    bad = rows["rope kernel s=32768 bf16: Triton vs torch"]
    assert bad["status"] == "FAIL" and "fwd q 5.0e-02" in bad["numbers"] and "OVER 1.6e-02" in bad["numbers"]
    assert rows["rope kernel s=131072 bf16: Triton vs torch"]["status"] == "PASS"
    assert rows["rope s=32768 bf16"]["status"] == "PASS" and "TE" not in rows["rope s=32768 bf16"]["numbers"]
    liger = rows["rope s=131072 bf16"]
    assert liger["status"] == "FAIL" and "Liger's RoPE differs from megatron's standard RoPE" in liger["numbers"]
    te = rows["rope baseline: TE fused RoPE"]
    assert te["status"] == "SKIP" and te["numbers"] == "not measured: TE not installed"
    assert "rope model step" in rows and "te spec" in rows["rope model step"]["numbers"]


@pytest.mark.parametrize("pytest_log, status, words", [
    (PYTEST_GPU_LOG, "PASS", "passed: test_triton_offsets_past_2_to_the_31_on_gpu"),
    ("F.\nPASSED tests/kernels/test_triton_rope.py::test_triton_kernel_matches_torch_kernel_on_gpu\n"
     "FAILED tests/kernels/test_triton_rope.py::test_triton_offsets_past_2_to_the_31_on_gpu - AssertionError: rows past "
     "2**31 untouched\n1 failed, 1 passed, 150 deselected in 61.20s\n", "FAIL", "rows past 2**31 untouched"),
    ("..\nPASSED tests/kernels/test_triton_rope.py::test_triton_kernel_matches_torch_kernel_on_gpu\n"
     "SKIPPED [1] tests/kernels/test_triton_rope.py:90: needs 40 GiB of GPU memory\n"
     "1 passed, 1 skipped, 150 deselected in 9.20s\n", "FAIL", "needs 40 GiB of GPU memory"),
    ("..\n2 passed, 150 deselected in 61.20s (0:01:01)\n", "FAIL", "no gpu test of the kernel's 64-bit offsets ran"),
])
def test_the_64bit_offset_test_has_its_own_row(tmp_path, pytest_log, status, words):
    write_outdir(tmp_path, [("pytest", "gpu tests (pytest -m gpu)", 1 if "failed" in pytest_log else 0, 70, 140,
                             "pytest_gpu.log", "")], {"pytest_gpu.log": pytest_log}, rope_json=None)
    _, rows = table(tmp_path)
    row = rows["rope kernel 64-bit offsets (pytest)"]
    assert row["status"] == status and words in row["numbers"], row


SPEC_TE = "layer spec: transformer_engine (megatron's TE layer spec)"


@pytest.mark.parametrize("role, expect, announce, problem", [
    ("harpe", HARPE_EXPECT, (KERNEL_TRITON,), "no 'layer spec: ...' line in the log (expected local)"),
    ("harpe", HARPE_EXPECT, (SPEC_LOCAL,), "no 'HARPE RoPE kernel: ...' line in the log (expected triton)"),
    # the build-time line quotes the kernel line: that is not the kernel's own
    ("harpe", HARPE_EXPECT, (SPEC_LOCAL, HARPE_PATH), "no 'HARPE RoPE kernel: ...' line in the log (expected triton)"),
    ("harpe", HARPE_EXPECT, (SPEC_TE, KERNEL_TRITON), "layer spec transformer_engine ran, expected local"),
    ("harpe", HARPE_EXPECT, (SPEC_LOCAL, "HARPE RoPE kernel: torch (first call, on cuda:0)"),
     "HARPE RoPE kernel torch ran, expected triton"),
    ("harpe", "spec=transformer_engine,kernel=triton", (SPEC_LOCAL, KERNEL_TRITON),
     "layer spec local ran, expected transformer_engine"),
    ("standard", STANDARD_EXPECT, (SPEC_LOCAL, KERNEL_TRITON), "HARPE RoPE kernel triton in a standard-RoPE run"),
    ("standard", STANDARD_EXPECT, (STANDARD_PATH,), "no 'layer spec: ...' line in the log (expected local)"),
])
def test_pretrain_row_fails_unless_the_log_says_the_expected_spec_and_kernel(tmp_path, role, expect, announce,
                                                                              problem):
    name = f"pretrain {role}"
    write_outdir(tmp_path, [(f"pretrain:{role}", name, 0, 60, 90, "run.log", "", expect)],
                 {"run.log": megatron_log(announce=announce)}, rope_json=None)
    proc, rows = table(tmp_path)
    assert proc.returncode == 1
    assert rows[name]["status"] == "FAIL" and rows[name]["numbers"].startswith(problem), rows[name]


def test_pretrain_row_reads_the_lines_under_torchrun_and_without_expectations(tmp_path):
    write_outdir(tmp_path, [("pretrain:harpe", "pretrain HARPE", 0, 60, 90, "harpe.log", "", HARPE_EXPECT),
                            ("pretrain:standard", "pretrain standard", 0, 60, 90, "standard.log", "", STANDARD_EXPECT),
                            ("pretrain:other", "pretrain other", 0, 60, 90, "other.log", "")],
                 {"harpe.log": megatron_log(announce=("[rank0]: " + SPEC_TE.replace("transformer_engine", "local"),
                                                      "[rank0]: " + KERNEL_TRITON)),
                  "standard.log": megatron_log(announce=(SPEC_LOCAL, "HARPE RoPE kernel: none")),
                  "other.log": megatron_log(announce=())}, rope_json=None)
    _, rows = table(tmp_path)
    assert rows["pretrain HARPE"]["status"] == "PASS", rows["pretrain HARPE"]
    assert rows["pretrain HARPE"]["data"]["spec"] == ["local"] and rows["pretrain HARPE"]["data"]["kernel"] == ["triton"]
    assert rows["pretrain standard"]["status"] == "PASS"  # 'none' is no HARPE kernel
    assert rows["pretrain other"]["status"] == "PASS"  # a step without expectations checks none


def test_a_crashed_run_is_not_blamed_for_the_missing_spec_line(tmp_path):
    log = megatron_log(stop_at=0, announce=()) + "[rank0]: ValueError: apply_rope_fusion is not available.\n"
    write_outdir(tmp_path, [("pretrain:harpe", "pretrain HARPE", 1, 9, 90, "harpe.log", "", HARPE_EXPECT)],
                 {"harpe.log": log}, rope_json=None)
    _, rows = table(tmp_path)
    numbers = rows["pretrain HARPE"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == "FAIL" and numbers.startswith("exit 1: [rank0]: ValueError: apply_rope")
    assert "layer spec" not in numbers


# --- the whole script, GPU steps faked -----------------------------------------------------------------------------

def fake_python(tmp_path, rope_sleep=0, standard_fails=False, missing="", site=None, pip_fails=False):
    """A 'python' that answers each GPU step of gpu_check.sh with what the real one would print.

    ``missing``: the modules its probe reports missing until ``-m pip install --target SITE`` has run (it records
    its arguments in ``calls/pip``, creates SITE with megatron's prebuilt dataset helpers, and from then on the
    probe finds everything if PYTHONPATH starts with SITE). Every step records its PYTHONPATH in ``calls/``."""
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    (fixtures / "pytest.log").write_text(PYTEST_GPU_LOG)
    (fixtures / "rope.json").write_text(json.dumps(BARE_ROPE_JSON))
    (fixtures / "harpe.log").write_text(megatron_log(ms=1010.0, peak=36500.0))
    standard = megatron_log(announce=(SPEC_LOCAL, STANDARD_PATH))
    (fixtures / "standard.log").write_text(megatron_log(stop_at=4, announce=(SPEC_LOCAL, STANDARD_PATH)) +
                                           "[rank0]: RuntimeError: boom\n" if standard_fails else standard)
    site = site or tmp_path / "site"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
record() {{ printf '%s\\n' "${{PYTHONPATH:-}}" > {calls}/$1; }}
case " $* " in
  *" -m pip install "*)
    printf '%s\\n' "$@" > {calls}/pip
    {"echo 'ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device'; exit 1" if pip_fails else ":"}
    mkdir -p {site}/megatron/core/datasets && touch {site}/megatron/core/datasets/helpers_cpp.cpython-312-x86_64-linux-gnu.so
    touch {calls}/installed ;;
  *"liger_kernel"*)   # gpu_check.sh's module probe
    if [[ -e {calls}/installed && ${{PYTHONPATH:-}} == {site}:* ]]; then echo ""; else echo {shlex.quote(missing)}; fi ;;
  *" benchmarks/gpu_check_report.py env "*) echo "gpu:                Fake H200, 140 GiB"; exit 0 ;;
  *" benchmarks/gpu_check_report.py table "*) exec {shlex.quote(sys.executable)} "$@" ;;
  *" -m pytest -m gpu "*) record pytest; cat {fixtures}/pytest.log ;;
  *" tools/plan_parallelism.py "*) record planner; exec {shlex.quote(PYTHON)} "$@" ;;
  *" benchmarks/rope.py "*)
    record rope
    sleep {rope_sleep}
    while (( $# )); do [[ $1 == --json ]] && cp {fixtures}/rope.json "$2"; shift; done
    echo "rope done" ;;
  *" --harpe-strategy "*) [[ $CUDA_DEVICE_MAX_CONNECTIONS == 1 ]] || exit 9; record harpe; cat {fixtures}/harpe.log ;;
  *" pretrain_harpe.py "*) record standard; cat {fixtures}/standard.log; {"exit 1" if standard_fails else ":"} ;;
  *) echo "fake python: unexpected $*" >&2; exit 3 ;;   # the TE and flash-attn probes: not installed
esac
""")
    fake.chmod(0o755)
    return str(fake)


def test_whole_script_with_fake_gpu_steps(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          # a loaded CPU: megatron's import is slow
                          env=script_env({"TIMEOUT_PLANNER": str(HANG_GUARD_S)},
                                         python=fake_python(tmp_path, standard_fails=True)))
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
    # what the bare machine gives: the local spec expected in both runs, TE's baseline a SKIP row, no wheels needed
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [(s[0], s[7]) for s in steps if s[0].startswith("pretrain")] == [("pretrain:harpe", HARPE_EXPECT),
                                                                           ("pretrain:standard", STANDARD_EXPECT)]
    assert rows["rope baseline: TE fused RoPE"]["status"] == "SKIP"
    assert rows["rope kernel 64-bit offsets (pytest)"]["status"] == "PASS"
    assert not any(check.startswith("wheels") for check in rows)
    assert "wheels:             not needed" in (out / "env.txt").read_text()
    assert [line for line in proc.stderr.splitlines() if "flash-attn" in line] == [
        f"warning: flash-attn is not installed for {tmp_path / 'python'}: --attention-backend auto (Transformer "
        "Engine picks; ATTENTION_BACKEND=flash forces flash)"]
    # every step imports megatron_harpe from this repository
    assert (tmp_path / "calls" / "rope").read_text().strip().split(":")[0] == REPO
    # a second run refuses the directory
    again = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                           env=script_env(python=str(tmp_path / "python")))
    assert again.returncode == 2 and "--force" in again.stderr


def test_a_step_past_its_limit_is_a_fail_row_and_the_rest_still_run(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=script_env({"TIMEOUT_ROPE": "2"}, python=fake_python(tmp_path, rope_sleep=60)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # stopped at its limit: the fake benchmark never got past its sleep to write its results
    assert "rope done" not in (out / "rope.log").read_text() and not (out / "rope.json").exists()
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["rope benchmark"]["status"] == "FAIL" and "timed out after 2 s" in rows["rope benchmark"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == rows["pretrain standard RoPE"]["status"] == "PASS"


def test_interrupt_stops_the_step_skips_the_rest_and_prints_the_table(tmp_path):
    out = tmp_path / "check"
    stdout = tmp_path / "stdout"
    with open(stdout, "w") as f:
        # SIGINT at its default in the script: a suite started in the background (`cmd &` in a script) has it
        # ignored, and bash cannot trap a signal ignored on entry
        proc = subprocess.Popen([SCRIPT, str(out)], stdout=f, stderr=subprocess.STDOUT,
                                env=script_env(python=fake_python(tmp_path, rope_sleep=60)),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while "--- rope benchmark" not in stdout.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_GUARD_S) == 130, stdout.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["gpu tests (pytest -m gpu)"]["status"] == "PASS"
    assert rows["rope benchmark"]["status"] == "FAIL" and "interrupted" in rows["rope benchmark"]["numbers"]
    assert rows["pretrain HARPE"]["status"] == rows["pretrain standard RoPE"]["status"] == "SKIP"
    assert "| check | status |" in stdout.read_text()


# --- a bare machine: the wheels --------------------------------------------------------------------------------------

WHEEL_NAMES = ("megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
               "liger_kernel-0.8.5-py3-none-any.whl", "nltk-3.10.4-py3-none-any.whl")
BARE = "megatron.core megatron.training liger_kernel"  # what the probe finds missing on the lent H200


def wheels_dir(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    for name in WHEEL_NAMES:
        (folder / name).write_bytes(b"")
    return folder


def test_dry_run_lists_the_wheel_install_when_megatron_core_is_missing(tmp_path):
    site, whl = tmp_path / "site", wheels_dir(tmp_path)
    fake = fake_python(tmp_path, missing=BARE, site=site)
    commands = dry_run_commands(tmp_path / "check", python=fake, WHEELS_DIR=str(whl), WHEEL_SITE=str(site))
    install = commands[0]
    assert install[:4] == ["timeout", "-k", "10", "30"] and install[4:8] == [fake, "-m", "pip", "install"]
    assert {"--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade"} <= set(install)
    assert install[install.index("--target") + 1] == str(site)
    assert sorted(install[-3:]) == sorted(str(whl / name) for name in WHEEL_NAMES)
    assert "gpu_check_report.py env" in " ".join(commands[1])
    limits = [int(c[3]) for c in commands if c[0] == "timeout"]
    assert len(limits) == 7 and sum(limits) < 8 * 60
    assert not (tmp_path / "calls" / "pip").exists() and not site.exists()  # a dry run installs nothing
    # nothing missing: no install line, whatever WHEELS_DIR holds
    (tmp_path / "ok").mkdir()
    fake_ok = fake_python(tmp_path / "ok", site=site)
    assert not any("pip" in c for c in dry_run_commands(tmp_path / "check", python=fake_ok, WHEELS_DIR=str(whl)))


def test_wheels_are_installed_when_megatron_core_is_missing(tmp_path):
    site, whl = tmp_path / "site", wheels_dir(tmp_path)
    fake = fake_python(tmp_path, missing=BARE, site=site)
    out = tmp_path / "check"
    proc = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=script_env({"WHEELS_DIR": str(whl), "WHEEL_SITE": str(site),
                                          "TIMEOUT_PLANNER": str(HANG_GUARD_S)},
                                         python=fake))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pip = (tmp_path / "calls" / "pip").read_text().splitlines()
    assert pip[:3] == ["-m", "pip", "install"] and {"--no-index", "--no-deps", "--upgrade"} <= set(pip)
    assert pip[pip.index("--target") + 1] == str(site) and sorted(pip[-3:]) == sorted(str(whl / n) for n in WHEEL_NAMES)
    # every later step sees the installed wheels first, then this repository
    for step in ("pytest", "rope", "harpe", "standard", "planner"):
        path = (tmp_path / "calls" / step).read_text().strip().split(":")
        assert path[:2] == [str(site), REPO], (step, path)
    rows = {r["check"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    wheels = rows["wheels (megatron-core, Liger-Kernel, nltk)"]
    assert wheels["status"] == "PASS" and wheels["numbers"].startswith(f"installed 3 wheels into {site}")
    assert "megatron.core megatron.training liger_kernel" in (out / "env.txt").read_text()
    assert (out / "wheels.log").exists()


def test_without_megatron_core_and_without_wheels_it_says_what_to_do(tmp_path):
    out = tmp_path / "check"
    fake = fake_python(tmp_path, missing=BARE)
    for args in ([str(out)], ["--dry-run", str(out)]):
        proc = run_script(*args, python=fake, env={"WHEELS_DIR": str(tmp_path / "empty")})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "megatron-core is not importable" in proc.stderr and "benchmarks/gpu_wheels.sh" in proc.stderr
    assert not out.exists() and not (tmp_path / "calls" / "pip").exists()


def test_a_failed_wheel_install_stops_before_any_step(tmp_path):
    site, whl = tmp_path / "site", wheels_dir(tmp_path)
    fake = fake_python(tmp_path, missing=BARE, site=site, pip_fails=True)
    out = tmp_path / "check"
    proc = run_script(str(out), python=fake, env={"WHEELS_DIR": str(whl), "WHEEL_SITE": str(site)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "No space left on device" in proc.stderr and "installing the wheels" in proc.stderr
    assert not out.exists() and not (tmp_path / "calls" / "pytest").exists()


# --- benchmarks/gpu_wheels.sh ----------------------------------------------------------------------------------------

WHEELS_SCRIPT = os.path.join(REPO, "benchmarks", "gpu_wheels.sh")


def fake_pip(tmp_path, fail_on=""):
    """A 'python' whose '-m pip download ... -d DIR NAME==VERSION' records its arguments and saves a wheel file."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "pip-python"
    fake.write_text(f"""#!/usr/bin/env bash
printf '%s ' "$@" >> {log}; echo >> {log}
dest="" pin="${{@: -1}}"
while (( $# )); do [[ $1 == -d ]] && dest=$2; shift; done
[[ -n "{fail_on}" && $pin == "{fail_on}"* ]] && {{ echo "ERROR: No matching distribution found for $pin" >&2; exit 1; }}
name=${{pin%%==*}}; version=${{pin#*==}}
touch "$dest/${{name//-/_}}-$version-py3-none-any.whl"
""")
    fake.chmod(0o755)
    return str(fake), log


def test_gpu_wheels_downloads_the_pins_for_the_bare_machine(tmp_path):
    fake, log = fake_pip(tmp_path)
    dest = tmp_path / "whl"
    dest.mkdir()
    (dest / "megatron_core-0.19.1-py3-none-any.whl").write_bytes(b"old")  # another version: replaced
    (dest / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHON=fake)
    proc = subprocess.run([WHEELS_SCRIPT, "--dest", str(dest)], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    pins = subprocess.run([WHEELS_SCRIPT, "--list"], capture_output=True, text=True,
                          timeout=HANG_GUARD_S).stdout.split()
    assert "megatron-core==0.19.2" in pins and any(p.startswith("liger-kernel==") for p in pins)
    assert "nltk==3.10.4" in pins and "defusedxml==0.7.1" in pins  # nltk's requirement the machine lacks
    calls = log.read_text().splitlines()
    assert len(calls) == len(pins)
    for call, pin in zip(calls, pins):
        args = call.split()
        assert args[:3] == ["-m", "pip", "download"] and args[-1] == pin
        assert {"--no-deps", "--only-binary=:all:", "--implementation", "--platform"} <= set(args)
        assert args[args.index("--python-version") + 1] == "3.12"
        assert "manylinux_2_28_x86_64" in args and "manylinux2014_x86_64" in args
    names = sorted(p.name for p in dest.iterdir())
    assert "megatron_core-0.19.1-py3-none-any.whl" not in names and "keep.txt" in names
    assert len([n for n in names if n.endswith(".whl")]) == len(pins)
    # a second run has them all: nothing downloaded
    again = subprocess.run([WHEELS_SCRIPT, "--dest", str(dest)], capture_output=True, text=True, env=env,
                           timeout=HANG_GUARD_S)
    assert again.returncode == 0 and "already holds" in again.stdout and len(log.read_text().splitlines()) == len(pins)


def test_gpu_wheels_failures_leave_the_folder_as_it_was(tmp_path):
    fake, _ = fake_pip(tmp_path, fail_on="nltk")
    dest = tmp_path / "whl"
    proc = subprocess.run([WHEELS_SCRIPT, "--dest", str(dest)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=fake), timeout=HANG_GUARD_S)
    assert proc.returncode == 1 and "could not download nltk==" in proc.stderr
    assert not dest.exists() or not any(dest.iterdir())
    assert not list(tmp_path.glob(".whl-download.*"))  # its temporary folder is gone
    bad = subprocess.run([WHEELS_SCRIPT, "--bogus"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
