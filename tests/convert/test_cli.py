"""Conversion safety (issue 15): opt-in unpickling, a full disk, the export's special ids, index, permissions and
transformers guard, and a light --help. The refused command lines themselves are rows of misuse_cases.py."""

import errno
import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_harpe.convert.cli import hf_to_megatron, megatron_to_hf, reshard
from tiny_checkpoints import add_payload, copy_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = "error: writing .* failed: no space left on the device"


def test_pickle_payload_runs_only_with_allow_pickle(tmp_path, request, capsys):
    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    marker = tmp_path / "PAYLOAD_RAN"
    add_payload(ckpt, marker)
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert reshard(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "r"), "--tp", "2", "--pp", "1"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists() and not (tmp_path / "r").exists()
    # The payload is real: the opt-in runs it (what the default refuses to do).
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf"), "--allow-pickle"]) == 0
    assert marker.exists()


def fail_with(error):
    def writer(*args, **kwargs):
        raise error
    return writer


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TORCH_ZIP_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                              "data/3: file write failed")


@pytest.mark.parametrize("error", [ENOSPC, TORCH_ZIP_FULL], ids=["oserror", "torch-zip-writer"])
def test_full_disk_during_torch_save(tmp_path, request, capsys, monkeypatch, error):
    hf = copy_of("hf", tmp_path / "hf", request.getfixturevalue)
    monkeypatch.setattr(torch, "save", fail_with(error))
    capsys.readouterr()
    assert hf_to_megatron(["--hf-dir", str(hf), "--out", str(tmp_path / "m"), "--format", "torch"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err and "free space there" in errors[0], err
    assert os.listdir(tmp_path) == ["hf"]  # nothing partial beside the input


@pytest.mark.parametrize("error", [ENOSPC, TORCH_ZIP_FULL], ids=["oserror", "torch-zip-writer"])
def test_full_disk_during_torch_dist_save(tmp_path, request, capsys, monkeypatch, error):
    """torch.distributed.checkpoint wraps the file writer's error in a CheckpointException; the cause still reaches
    the user."""
    from torch.distributed.checkpoint import filesystem

    hf = copy_of("hf", tmp_path / "hf", request.getfixturevalue)
    monkeypatch.setattr(filesystem, "_write_item", fail_with(error))
    assert hf_to_megatron(["--hf-dir", str(hf), "--out", str(tmp_path / "m"), "--format", "torch_dist"]) == 1
    assert f"{tmp_path / 'm'} failed: no space left on the device" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p != "hf"]


def test_full_disk_during_export(tmp_path, request, capsys, monkeypatch):
    """The shards are laid out sparse: a full disk shows while tensors are written into them."""
    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    pwrite = os.pwrite

    def full_after_the_header(fd, data, offset):
        if offset > 0:
            raise ENOSPC
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_the_header)
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert "no space left on the device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["ckpt"]


def train_tokenizer(prefix, **ids):
    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    return train_sentencepiece([FillerText(s).document(2000) for s in range(3)], str(prefix), vocab_size=300,
                               byte_fallback=False, **ids)


@pytest.mark.parametrize("ids, expected", [
    (dict(unk_id=0, pad_id=1, bos_id=2, eos_id=3), dict(bos_token_id=2, eos_token_id=3, pad_token_id=1)),
    (dict(unk_id=3, bos_id=0, eos_id=1, pad_id=-1), dict(bos_token_id=0, eos_token_id=1, pad_token_id=None)),
])
def test_special_ids_come_from_the_tokenizer(tmp_path, request, ids, expected):
    from transformers import AutoTokenizer

    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    spm = train_tokenizer(tmp_path / "tok", **ids)
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer-model", spm]) == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    generation = json.load(open(tmp_path / "hf" / "generation_config.json"))
    for key, value in expected.items():
        assert config.get(key) == value and generation.get(key) == value, (key, config, generation)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == tuple(expected.values())
    assert tokenizer.unk_token_id == ids["unk_id"]


def test_without_a_tokenizer_the_ids_are_llama2s(tmp_path, request):
    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (1, 2, None)


def test_index_total_size_counts_tensor_bytes(tmp_path, request):
    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(tmp_path / "hf"), "--max-shard-gb", "0.0001",
                           "--dtype", "bf16"]) == 0
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    tensors = {k: v for shard in shards for k, v in load_file(tmp_path / "hf" / shard).items()}
    assert sorted(tensors) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] < sum(os.path.getsize(tmp_path / "hf" / s) for s in shards)  # no headers


def test_export_gets_the_umask_permissions(tmp_path, request):
    """A teammate can read an export made under umask 022 (mkdtemp's 0700 and a 0600 tokenizer do not leak)."""
    hf = copy_of("hf", tmp_path / "hf", request.getfixturevalue)
    spm = train_tokenizer(tmp_path / "tok")
    os.chmod(spm, 0o600)
    saved = os.umask(0o022)
    try:
        assert hf_to_megatron(["--hf-dir", str(hf), "--out", str(tmp_path / "m"), "--format", "torch",
                               "--harpe-bases", "1e4,2e4,4e4,8e4"]) == 0
        assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "out"),
                               "--tokenizer-model", spm]) == 0
    finally:
        os.umask(saved)
    for root in (tmp_path / "m", tmp_path / "out"):
        paths = [root, *root.rglob("*")]
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
        assert {p: m for p, m in modes.items() if m != (0o755 if os.path.isdir(tmp_path / p) else 0o644)} == {}
    assert (tmp_path / "out" / "modeling_harpe_llama.py").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()


def test_force_replaces_our_own_export(tmp_path, request):
    ckpt = copy_of("torch", tmp_path / "ckpt", request.getfixturevalue)
    out = tmp_path / "hf"
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(out)]) == 0
    assert megatron_to_hf(["--megatron-dir", str(ckpt), "--out", str(out), "--dtype", "bf16", "--force"]) == 0
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def load_modeling_file():
    path = os.path.join(REPO, "megatron_harpe", "hf", "modeling_harpe_llama.py")
    spec = importlib.util.spec_from_file_location("megatron_harpe.hf._version_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exported_model_code_names_the_transformers_it_needs(monkeypatch):
    import transformers

    assert load_modeling_file().HarpeLlamaForCausalLM  # the installed transformers is new enough
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers>=5\.24,<6 \(found 4\.57\.1\): pip install"):
        load_modeling_file()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # has get_interface, not yet cache=
    with pytest.raises(ImportError, match="found 5.17.0"):
        load_modeling_file()


HELP_PROBE = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path[0] = os.path.dirname(os.path.abspath(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "transformers")))
"""


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron", "convert_megatron_to_hf", "reshard_megatron"])
def test_help_imports_neither_megatron_nor_torch(tool):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, os.path.join("tools", f"{tool}.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout and "--force" in proc.stdout, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-1000:]
