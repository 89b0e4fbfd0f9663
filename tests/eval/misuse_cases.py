"""Misuse rows for the evaluation commands (tools/eval_*.py, tools/compare_niah.py).

Every refusal here happens before a model loads: the model folders are a config.json (and code files) only.
"""

import json
import shutil
from pathlib import Path

from misuse import ROOT, Misuse

NIAH = "megatron_harpe.eval.cli:eval_niah"
PASSKEY = "megatron_harpe.eval.cli:eval_passkey"
PERPLEXITY = "megatron_harpe.eval.cli:eval_perplexity"
COMPARE = "megatron_harpe.eval.cli:compare_niah"
GRID = ["--lengths", "100", "--depths", "0"]
HARPE_AUTO_MAP = {"AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
                  "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM"}


def _file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def users_file(name: str, text: str = "the user's own file\n"):
    def setup(tmp, _):
        _file(tmp / "out" / name, text)
        return {}
    return setup


def edited_export(tmp, _):
    """A HARPE export whose modeling file was changed: importing it would leave {tmp}/ran.txt (the tree check)."""
    model = tmp / "model"
    model.mkdir()
    for name in ("configuration_harpe_llama.py", "modeling_harpe_llama.py"):
        shutil.copy(ROOT / "megatron_harpe" / "hf" / name, model / name)
    modeling = model / "modeling_harpe_llama.py"
    modeling.write_text(f"open({str(tmp / 'ran.txt')!r}, 'w').write('ran')\n" + modeling.read_text())
    _file(model / "config.json", json.dumps({"model_type": "harpe_llama", "auto_map": HARPE_AUTO_MAP}))
    return {}


def module_of_its_own(tmp, _):
    """Our two code files intact, but auto_map also names a module of the folder."""
    edited_export(tmp, _)
    model = tmp / "model"
    shutil.copy(ROOT / "megatron_harpe" / "hf" / "modeling_harpe_llama.py", model / "modeling_harpe_llama.py")
    _file(model / "custom_code.py", f"open({str(tmp / 'ran.txt')!r}, 'w').write('ran')\n")
    _file(model / "config.json", json.dumps({"model_type": "harpe_llama",
                                             "auto_map": {**HARPE_AUTO_MAP, "AutoModel": "custom_code.Model"}}))
    return {}


def bad_tokenizer(tmp, _):
    _file(tmp / "model" / "config.json", json.dumps({"model_type": "llama"}))
    _file(tmp / "model" / "tokenizer.model", "this is a text file, not a sentencepiece model\n")
    return {}


def niah_results(tmp, _):
    """{a}: a niah.json of eval_niah's shape; {bad}: a text file named like one."""
    cells = {"100@0": {"length": 100, "coordinate": 0.0, "score": 1.0}}
    _file(tmp / "a.json", json.dumps({"settings": {"lengths": [100], "depths": [0.0]}, "cells": cells}))
    _file(tmp / "bad.json", "length,depth,score\n100,0,1\n")
    _file(tmp / "passkey.json", json.dumps({"settings": {"lengths": [100], "trials": 1}, "cells": {}}))
    return {"a": str(tmp / "a.json"), "bad": str(tmp / "bad.json"), "passkey": str(tmp / "passkey.json")}


def compare_with_existing_picture(tmp, get):
    names = niah_results(tmp, get)
    _file(tmp / "c.png", "the user's picture")
    return names


CASES = [
    # 1: nothing in --out is replaced without --force (refused before the model loads).
    Misuse("1", "niah-keeps-users-picture", ["--model", "{tmp}/model", "--out", "{tmp}/out", *GRID],
           message=r"out/niah\.png exists: choose another --out or pass --force", entry=NIAH, exit_code=1,
           setup=users_file("niah.png")),
    Misuse("1", "niah-keeps-a-foreign-niah-json", ["--model", "{tmp}/model", "--out", "{tmp}/out", *GRID],
           message=r"out/niah\.json: not a results JSON written by eval_niah \(.*\): choose another --out, or pass "
                   r"--force", entry=NIAH, exit_code=1, setup=users_file("niah.json", '{"my": "notes"}')),
    Misuse("1", "ruler-keeps-a-foreign-results-file",
           ["--model", "{tmp}/model", "--out", "{tmp}/out", "--suite", "ruler", "--tasks", "single_1",
            "--lengths", "600"],
           message=r"ruler_single_1\.json: not a results JSON written by eval_niah --suite ruler", entry=NIAH,
           exit_code=1, setup=users_file("ruler_single_1.json")),
    Misuse("1", "passkey-keeps-a-foreign-results-file", ["--model", "{tmp}/model", "--out", "{tmp}/out",
                                                          "--lengths", "100"],
           message=r"passkey\.json: not a results JSON written by eval_passkey .*--force", entry=PASSKEY,
           exit_code=1, setup=users_file("passkey.json")),
    Misuse("1", "perplexity-keeps-existing-results", ["--model", "{tmp}/model", "--out", "{tmp}/out",
                                                       "--lengths", "64"],
           message=r"perplexity\.json exists: choose another --out or pass --force", entry=PERPLEXITY, exit_code=1,
           setup=users_file("perplexity.json", '{"perplexity": {"64": 3.1}}')),
    Misuse("1", "perplexity-out-is-a-file", ["--model", "{tmp}/model", "--out", "{tmp}/out/notes.txt",
                                              "--lengths", "64"],
           message=r"--out .*notes\.txt is a file: give a directory", entry=PERPLEXITY, exit_code=1,
           setup=users_file("notes.txt")),
    Misuse("1", "compare-keeps-existing-picture", ["{a}", "{a}", "--out", "{tmp}/c.png"],
           message=r"c\.png exists: choose another --out or pass --force", entry=COMPARE, exit_code=1,
           setup=compare_with_existing_picture),
    # 2: a model folder's own Python runs only with --trust-remote-code (ours is recognised by its files' hashes).
    Misuse("2", "niah-refuses-edited-export-code", ["--model", "{tmp}/model", "--out", "{tmp}/out", *GRID],
           message=r"/model: config\.json asks to run the folder's own Python \(configuration_harpe_llama, "
                   r"modeling_harpe_llama\), which is not megatron-harpe's export: .*--trust-remote-code",
           entry=NIAH, exit_code=1, setup=edited_export),
    Misuse("2", "passkey-refuses-a-module-of-its-own", ["--model", "{tmp}/model", "--out", "{tmp}/out",
                                                         "--lengths", "100"],
           message=r"/model: config\.json asks to run .*custom_code.*--trust-remote-code", entry=PASSKEY,
           exit_code=1, setup=module_of_its_own),
    Misuse("2", "perplexity-refuses-edited-export-code", ["--model", "{tmp}/model", "--out", "{tmp}/out",
                                                          "--lengths", "64"],
           message=r"/model: config\.json asks to run .*--trust-remote-code", entry=PERPLEXITY, exit_code=1,
           setup=edited_export),
    # 5: our own parsers take no abbreviations (Megatron's does): an unknown option is refused.
    Misuse("5", "niah-abbreviation-refused", ["--mod", "{tmp}/model", "--model", "{tmp}/model", "--out", "{tmp}/out"],
           message=r"unrecognized arguments: --mod ", entry=NIAH, exit_code=2),
    # 6: cryptic failures name the file and what it should have been.
    Misuse("6", "compare-names-a-non-json-results-file", ["{a}", "{bad}", "--out", "{tmp}/c.png"],
           message=r"bad\.json: not a results JSON written by eval_niah \(Expecting value.*\): give a niah\.json",
           entry=COMPARE, exit_code=1, setup=niah_results),
    Misuse("6", "compare-names-a-passkey-results-file", ["{passkey}", "{a}", "--out", "{tmp}/c.png"],
           message=r"passkey\.json: not a results JSON written by eval_niah \(its settings have no lengths and "
                   r"depths", entry=COMPARE, exit_code=1, setup=niah_results),
    Misuse("6", "compare-names-a-missing-results-file", ["{a}", "{tmp}/nothing.json", "--out", "{tmp}/c.png"],
           message=r"No such file or directory: .*nothing\.json", entry=COMPARE, exit_code=1, setup=niah_results),
    Misuse("6", "eval-names-a-bad-tokenizer-model", ["--model", "{tmp}/model", "--out", "{tmp}/out",
                                                     "--lengths", "64"],
           message=r"model/tokenizer\.model: not a sentencepiece model \(.*\): give a sentencepiece model",
           entry=PERPLEXITY, exit_code=1, setup=bad_tokenizer),
]
