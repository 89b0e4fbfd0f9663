"""``--help`` of every command answers without importing megatron (issue 15, item 8): it printed usage after 6-19 s and
1 GB because the package root imported megatron's model code. Time is measured in benchmarks/startup.py, not here.

Each command runs as a user runs it (a fresh interpreter, the script as ``__main__``) through a wrapper that writes
the names of the modules it imported once the command has exited.
"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
COMMANDS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py")) + ["pretrain_harpe.py"]
# Commands whose CLI is pure Python and numpy: their --help must not load torch either.
TORCH_FREE = {"tools/select_bases.py", "tools/harpe_demo.py"}
# pretrain_harpe.py's --help is Megatron-LM's own parser (every pretrain_gpt.py flag plus the HARPE group), so it
# imports megatron by design; it must still answer (megatron-core 0.19.2's own --help raises on a bare '%').
NEEDS_MEGATRON = {"pretrain_harpe.py"}

WRAPPER = """
import os, runpy, sys
script, record = sys.argv[1], sys.argv[2]
sys.argv = [script, "--help"]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
with open(record, "w") as f:
    f.write("\\n".join(sorted(sys.modules)))
sys.exit(code)
"""


def run_help(command: str, tmp_path: Path):
    record = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", WRAPPER, command, str(record)], cwd=ROOT, capture_output=True,
                          text=True)
    modules = record.read_text().split() if record.exists() else []
    return proc, modules


def test_every_tool_is_covered():
    assert "tools/select_bases.py" in COMMANDS and len(COMMANDS) >= 14


def _console_scripts() -> dict:
    """setup.py's console scripts, {name: "module:function"}, read from its text (no reinstall needed)."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"(harpe-[\w-]+)=([\w.]+:\w+)"', text))


def _tool_target(path: Path) -> str:
    """The "module:function" a tools/*.py front imports and exits with."""
    text = path.read_text()
    imported = re.findall(r"^\s+from (megatron_harpe[\w.]*) import (\w+)$", text, re.M)
    target = [(module, function) for module, function in imported if f"sys.exit({function}())" in text]
    assert len(target) == 1, f"{path.name}: expected one `from megatron_harpe... import f` and `sys.exit(f())`"
    return ":".join(target[0])


def test_every_tool_is_a_console_script_and_back():
    scripts = _console_scripts()
    tools = {"harpe-" + p.stem.replace("_", "-").removeprefix("harpe-"): _tool_target(p)
             for p in sorted((ROOT / "tools").glob("*.py"))}
    assert tools == scripts
    for target in scripts.values():  # each names a function that exists
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_megatron(command, tmp_path):
    proc, modules = run_help(command, tmp_path)
    assert proc.returncode == 0, f"{command} --help exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.lstrip().startswith("usage:"), proc.stdout[:500]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert modules, "the wrapper recorded no modules"
    if command in NEEDS_MEGATRON:
        assert "--harpe-bases" in proc.stdout and "--tensor-model-parallel-size" in proc.stdout
        return
    megatron = [m for m in modules if m == "megatron" or m.startswith("megatron.")]
    assert not megatron, f"{command} --help imported megatron: {megatron[:8]}"
    if command in TORCH_FREE:
        torch = [m for m in modules if m == "torch" or m.startswith("torch.")]
        assert not torch, f"{command} --help imported torch: {torch[:8]}"


def test_package_root_is_lazy(tmp_path):
    # `import megatron_harpe` loads nothing heavy; its public names still import on first use.
    code = ("import sys, megatron_harpe; heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')];"
            "print(len(heavy)); from megatron_harpe import HarpeGPTModel, PAPER_LLAMA2_7B_BASES, select_bases;"
            "print(HarpeGPTModel.__module__, len(PAPER_LLAMA2_7B_BASES), 'megatron.core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "megatron_harpe.model", "32", "True"]


# ----------------------------------------------------------------------------------------------------------
# The warnings filtered at those entry points: named ones only (issue 15, item 8).

def _shown(message, module, gpu=False, category=UserWarning):
    import warnings

    from megatron_harpe.warning_filters import filter_unactionable_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_unactionable_warnings(gpu=gpu)
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)
    return [str(w.message) for w in caught]


def test_unactionable_warnings_are_filtered_and_others_are_not():
    apex = "Apex is not installed. Falling back to Torch Norm"
    assert _shown(apex, "megatron.core.models.backends") == []
    assert _shown("absl.logging is not installed. Using logging.getLogger(__name__) instead.",
                  "megatron.core.hyper_comm_grid") == []
    # An unknown warning from the same module, the same text from another module, and the notice on a GPU machine
    # (where installing Apex is the fix) all get through.
    assert _shown("Apex is required for the fused optimizer", "megatron.core.models.backends") != []
    assert _shown(apex, "megatron_harpe.model") != []
    assert _shown(apex, "megatron.core.models.backends", gpu=True) != []


def test_unactionable_log_records_are_filtered_and_others_are_not(caplog):
    import logging

    from megatron_harpe.warning_filters import filter_unactionable_warnings

    logger = logging.getLogger("torch.utils.cpp_extension")
    saved = list(logger.filters)
    try:
        filter_unactionable_warnings(gpu=False)
        filter_unactionable_warnings(gpu=False)  # idempotent: one filter
        with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
            logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
            logger.warning("Error building extension 'harpe_rope'")
        assert [r.getMessage() for r in caplog.records] == ["Error building extension 'harpe_rope'"]
        assert sum(type(f).__name__ == "_DropMessage" for f in logger.filters) == 1
    finally:
        logger.filters[:] = saved
