"""Which Python a model folder may run (issue 15, item 2): none of the folder's own without --trust-remote-code.

A plain Llama loads with transformers' own code; our HARPE export is recognised by its two code files' sha256 and
built with the package's classes; anything else (an edited file, a module of its own) is refused without the flag,
and its code is not executed.
"""

import json
import shutil

import pytest

from megatron_harpe.eval.model import ModelLoadError, load_eval_model


def edited_copy(src, dst, marker):
    """``src`` with a line added to its modeling file that leaves ``marker`` behind when the file is imported."""
    shutil.copytree(src, dst)
    modeling = dst / "modeling_harpe_llama.py"
    modeling.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + modeling.read_text())
    return str(dst)


def test_our_export_loads_without_the_flag_from_the_package(tiny_harpe_dir):
    model = load_eval_model(tiny_harpe_dir, "cpu", "fp32")
    assert type(model.model).__module__ == "megatron_harpe.hf.modeling_harpe_llama"  # not the folder's copy
    assert model.model.config.harpe_bases == [1e4, 5e5]
    assert len(model.generate([[model.bos_id] + model.encode("a few words")], 2)) == 1


def test_edited_export_is_refused_and_not_run_without_the_flag(tmp_path, tiny_harpe_dir):
    marker = tmp_path / "ran.txt"
    folder = edited_copy(tiny_harpe_dir, tmp_path / "edited", marker)
    with pytest.raises(ModelLoadError, match=rf"{folder}: config.json asks to run .*--trust-remote-code"):
        load_eval_model(folder, "cpu", "fp32")
    assert not marker.exists()
    model = load_eval_model(folder, "cpu", "fp32", trust_remote_code=True)
    assert marker.read_text() == "ran" and type(model.model).__name__ == "HarpeLlamaForCausalLM"


def test_a_module_of_its_own_is_not_ours(tmp_path, tiny_harpe_dir):
    """Both code files intact, but auto_map also names another file of the folder: that one would run."""
    folder = tmp_path / "extra"
    shutil.copytree(tiny_harpe_dir, folder)
    (folder / "extra_model.py").write_text("raise SystemExit('must not run')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "extra_model.ExtraModel"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"extra_model.*--trust-remote-code"):
        load_eval_model(str(folder), "cpu", "fp32")


def test_plain_llama_loads_without_remote_code(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_eval_model(tiny_model_dir, "cpu", "fp32")
    assert seen == [False]
