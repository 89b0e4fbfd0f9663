"""Load a Hugging Face model directory for evaluation and generate greedily from token ids.

No Python from the model directory runs unless the user opts in (``trust_remote_code``). A directory without
``auto_map`` is a model transformers knows (a plain Llama). One whose ``auto_map`` names only our two code files,
byte for byte those of ``megatron_harpe/hf`` (compared by sha256 at run time), is our export: it is built with the
package's own classes, so nothing is imported from the directory either. Anything else needs ``--trust-remote-code``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_harpe.command import RunError

# The code files tools/convert_megatron_to_hf.py copies next to a HARPE export.
HARPE_CODE_FILES = ("configuration_harpe_llama.py", "modeling_harpe_llama.py")
_PACKAGE_HF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")


class ModelLoadError(RunError, ValueError):
    """A model directory that cannot be evaluated as given; the message says what to do."""


@dataclass
class EvalModel:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]     # text -> ids, no special tokens
    decode: Callable[[list[int]], str]
    bos_id: int
    device: torch.device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of equally long prompts (a batch), decoded."""
        ids = torch.tensor(prompts, device=self.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.bos_id)
        return [self.decode(row[ids.shape[1]:].tolist()) for row in out]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a JSON config (a JSON {type(config).__name__}, not an object)")
    return config


def code_references(config: dict) -> list[str]:
    """The ``module.Class`` references of a config's ``auto_map`` (tokenizer entries are [slow, fast] pairs)."""
    def flatten(value) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from flatten(item)
    return [ref for value in (config.get("auto_map") or {}).values() for ref in flatten(value)]


def is_harpe_export(path: str, config: dict) -> bool:
    """Whether ``auto_map`` points only at our code files, and both are identical to the package's."""
    references = code_references(config)
    modules = {ref.rsplit(".", 1)[0] for ref in references}
    if not references or "--" in "".join(references):  # "repo--module.Class" fetches code from the Hub
        return False
    if not modules <= {name[:-len(".py")] for name in HARPE_CODE_FILES}:
        return False
    return all(os.path.isfile(os.path.join(path, name))
               and _sha256(os.path.join(path, name)) == _sha256(os.path.join(_PACKAGE_HF_DIR, name))
               for name in HARPE_CODE_FILES)


def _refuse_remote_code(path: str, config_file: str, config: dict) -> None:
    modules = sorted({ref.rsplit(".", 1)[0] for ref in code_references(config)})
    raise ModelLoadError(f"{path}: {config_file} asks to run the folder's own Python ({', '.join(modules)}), which "
                         "is not megatron-harpe's export: inspect it and pass --trust-remote-code to run it")


def model_code(path: str, trust_remote_code: bool = False) -> str:
    """How ``path``'s model may be built: "transformers" (no auto_map), "harpe" (our export, with the package's
    classes) or "remote" (the folder's own code, only with ``trust_remote_code``); refused otherwise.

    Only JSON is read here: it runs before the tokenizer and the weights load, and never imports the folder's code.
    """
    config = _read_json(os.path.join(path, "config.json"))
    if config is None:
        raise FileNotFoundError(f"{path} has no config.json: give a Hugging Face model directory "
                                "(tools/convert_megatron_to_hf.py writes one)")
    if not config.get("auto_map"):
        return "transformers"
    if is_harpe_export(path, config):
        return "harpe"
    if not trust_remote_code:
        _refuse_remote_code(path, "config.json", config)
    return "remote"


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``path``, running the directory's own code only with ``trust_remote_code`` (see the module doc)."""
    code = model_code(path, trust_remote_code)
    if code == "harpe":
        from megatron_harpe.hf.modeling_harpe_llama import HarpeLlamaForCausalLM

        return HarpeLlamaForCausalLM.from_pretrained(path, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=code == "remote", dtype=dtype)


def load_eval_model(path: str, device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False) -> EvalModel:
    """A model directory written by tools/convert_megatron_to_hf.py (HARPE, recognised by its code files) or any
    HF Llama; other models with their own code only with ``trust_remote_code``.

    bf16 on a GPU, fp32 on a CPU by default. The tokenizer comes from the directory (tokenizer.model or
    tokenizer.json); what can be refused (remote code, a bad tokenizer) is, before the weights load.
    """
    model_code(path, trust_remote_code)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    spm = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm):
        from megatron_harpe.data.tokenizer import load_sentencepiece

        processor = load_sentencepiece(spm)
        encode, decode, bos_id = processor.encode, processor.decode, processor.bos_id()
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        if tokenizer_config.get("auto_map") and not trust_remote_code:
            _refuse_remote_code(path, "tokenizer_config.json", tokenizer_config)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        encode, decode = (lambda t: tok.encode(t, add_special_tokens=False)), tok.decode
        bos_id = tok.bos_token_id if tok.bos_token_id is not None else 1
    else:
        raise FileNotFoundError(f"{path} has no tokenizer.model or tokenizer.json: export with --tokenizer-model")
    model = load_causal_lm(path, torch_dtype, trust_remote_code).to(device).eval()
    return EvalModel(model, encode, decode, bos_id, device)
