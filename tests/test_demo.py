"""The HARPE demonstration (step 1 of examples/quickstart_cpu.sh): bases, waveforms and a TP=2 check."""

import json

import pytest

from megatron_harpe.cli import demo as main
from megatron_harpe.outputs import MANIFEST
from megatron_harpe.warning_filters import has_nvidia_gpu

pytestmark = pytest.mark.multirank


def test_demo_writes_bases_pictures_and_a_passing_tp2_check(tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["--out", str(out)]) == 0
    if not has_nvidia_gpu():  # the spawned ranks too (capfd sees their stderr): no "Apex is not installed" notices
        err = capfd.readouterr().err
        assert "is not installed" not in err and "No CUDA runtime is found" not in err, err[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n != MANIFEST] == ["bases.json", "tp2_rank0.json", "tp2_rank1.json",
                                                   "waveforms_paper_table2.png", "waveforms_peak_valley.png"]
    bases = json.loads((out / "bases.json").read_text())
    assert len(bases["peak_valley"]) == 32 and bases["peak_valley"][0] == 1e6
    for rank in range(2):
        check = json.loads((out / f"tp2_rank{rank}.json").read_text())
        assert check["max_abs_logit_diff"] < 1e-4 and check["max_abs_grad_diff"] < 1e-4
    assert (out / "waveforms_peak_valley.png").read_bytes()[:4] == b"\x89PNG"
    # A second run refuses to overwrite without --force (exit 1: an output that may not be replaced), and leaves
    # the results alone.
    assert main(["--out", str(out)]) == 1
    assert "--force" in capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == names
