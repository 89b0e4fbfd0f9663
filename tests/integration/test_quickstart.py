"""The README's main-job command, end to end on a reduced setting: data -> training -> export -> evaluation."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "quickstart_cpu.sh")
# A hang guard, not a speed limit (the whole chain takes minutes on 2 cores, several times that on a loaded machine).
HANG_GUARD_S = 1800


@pytest.mark.multirank
def test_quickstart_runs_the_whole_chain(tmp_path):
    out = tmp_path / "qs"
    from megatron_harpe.distributed import free_port

    # A fresh port: this process may hold a process group whose MASTER_PORT the children would inherit.
    env = dict(os.environ, DOCS_PER_SOURCE="60", TRAIN_ITERS="10", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    run = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for path in ("demo/bases.json", "data/mixture.bin", "data/mixture.length_histogram.png", "hf/config.json",
                 "hf/modeling_harpe_llama.py", "hf/tokenizer.model", "eval/niah/niah.png"):
        assert (out / path).is_file(), path
    metrics = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert max(m["iteration"] for m in metrics) == 10
    niah = json.loads((out / "eval" / "niah" / "niah.json").read_text())
    assert len(niah["cells"]) == 15 and 0.0 <= niah["mean_score"] <= 1.0
    assert set(json.loads((out / "eval" / "passkey" / "passkey.json").read_text())["mean_by_length"]) == {"192", "240"}
    assert "Everything is under" in run.stdout
    # the refusal comes before any step: no second run of the chain
    again = subprocess.run([SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 1 and "pass --force" in again.stderr
