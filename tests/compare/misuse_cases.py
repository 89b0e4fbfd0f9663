"""Misuse rows for harpe-compare-methods (tools/compare_methods.py, examples/compare_methods_cpu.sh).

Every refusal happens before any training: nothing is written into --out.
"""

import json
from pathlib import Path

from misuse import Misuse

COMPARE = "megatron_harpe.compare.cli:compare_methods"


def _file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def users_notes(tmp, _):
    _file(tmp / "out" / "notes.txt", "the user's own file\n")
    return {}


def other_comparison(tmp, _):
    _file(tmp / "out" / "compare.json", json.dumps({"name": "cpu", "l0": 128}))
    return {}


def no_manifest(tmp, _):
    (tmp / "out" / "runs").mkdir(parents=True)
    return {}


CASES = [
    # 1: nothing a user wrote is removed, --force included; another comparison is not mixed in.
    Misuse("1", "compare-keeps-users-files", ["--preset", "ci", "--out", "{tmp}/out", "--force"],
           message=r"out holds notes\.txt, which compare_methods did not write: choose another --out "
                   r"\(--force would not delete them\)", entry=COMPARE, exit_code=2, setup=users_notes),
    Misuse("1", "compare-refuses-another-comparisons-out", ["--preset", "ci", "--out", "{tmp}/out"],
           message=r"out holds a comparison with other settings \(.+\): choose another --out, or pass --force",
           entry=COMPARE, exit_code=2, setup=other_comparison),
    Misuse("1", "compare-refuses-an-out-without-its-manifest", ["--preset", "ci", "--out", "{tmp}/out"],
           message=r"out has no readable compare\.json: pass --force to start it over", entry=COMPARE, exit_code=2,
           setup=no_manifest),
    # 5: unknown values and options are refused, not ignored.
    Misuse("5", "compare-unknown-method", ["--preset", "ci", "--out", "{tmp}/out", "--methods", "harpe,abf"],
           message=r"--methods: unknown harpe; choose from none, harpe_peak_valley, harpe_uniform, abf, "
                   r"abf_multistage, pi, yarn", entry=COMPARE, exit_code=2),
    Misuse("5", "compare-zero-seeds", ["--preset", "ci", "--out", "{tmp}/out", "--seeds", "0"],
           message=r"--seeds 0: give at least 1", entry=COMPARE, exit_code=2),
    Misuse("5", "compare-needs-out", ["--preset", "cpu"], message=r"--preset cpu needs --out DIR", entry=COMPARE,
           exit_code=2),
    Misuse("5", "compare-paper-writes-nothing", ["--preset", "paper", "--out", "{tmp}/out"],
           message=r"--preset paper prints commands and writes nothing: drop --out", entry=COMPARE, exit_code=2),
    Misuse("5", "compare-abbreviation-refused", ["--preset", "ci", "--out", "{tmp}/out", "--seed", "2"],
           message=r"unrecognized arguments: --seed 2", entry=COMPARE, exit_code=2),
    Misuse("5", "compare-script-unknown-option", ["bash", "examples/compare_methods_cpu.sh", "{tmp}/out", "--fast"],
           message=r"unknown option --fast \(usage: \[OUTDIR\] \[--force\] \[--seeds N\] \[--methods LIST\]\)",
           exit_code=2),
]
