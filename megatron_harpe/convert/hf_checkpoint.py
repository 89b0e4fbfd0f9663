"""Hugging Face Llama checkpoints: read lazily (safetensors), write in shards with an index, config and tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_harpe.convert.mapping import GLOBAL_TABLE, LAYER_TABLE, ConversionError, hf_layer_name
from megatron_harpe.convert.rope_scaling import hf_rope_parameters
from megatron_harpe.shape import LlamaShape, ShapeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
HARPE_FILES = ("configuration_harpe_llama.py", "modeling_harpe_llama.py")


def required_hf_names(shape: LlamaShape) -> list[str]:
    names = [hf for _, hf, _, _ in GLOBAL_TABLE]
    names += [hf_layer_name(layer, n) for layer in range(shape.num_layers) for _, hf_names, _ in LAYER_TABLE
              for n in hf_names]
    return names


class HFCheckpoint:
    """A Hugging Face Llama directory: config, shape, and tensors read one at a time from memory-mapped shards."""

    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{path} has no config.json: give a Hugging Face model directory")
        with open(config_path) as f:
            self.config = json.load(f)
        try:
            self.shape = LlamaShape.from_hf_config(self.config, config_path)
        except ShapeError as e:  # the checkpoint is the input that cannot be converted: a failed run
            raise ConversionError(str(e)) from None
        self.harpe_bases = self.config.get("harpe_bases")
        self.dtype = _CONFIG_DTYPES.get(str(self.config.get("torch_dtype", self.config.get("dtype", ""))), "bf16")
        self._pickled: dict[str, dict] = {}
        self.weight_map = self._weight_map(allow_pickle)
        missing = [n for n in required_hf_names(self.shape) if n not in self.weight_map]
        if missing:
            raise ConversionError(f"{path}: {len(missing)} tensors missing from the checkpoint (first: {missing[0]})")
        absent = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if absent:
            raise ConversionError(f"{path}: shard {absent[0]} listed in the index is missing")

    def _weight_map(self, allow_pickle: bool) -> dict[str, str]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(self.path, index_name)
            if os.path.isfile(index):
                if index_name.startswith("pytorch") and not allow_pickle:
                    raise ConversionError(f"{self.path} holds pickled .bin weights: pass --allow-pickle only if you "
                                          "trust them (unpickling runs code), or convert them to safetensors first")
                with open(index) as f:
                    return json.load(f)["weight_map"]
        single = os.path.join(self.path, "model.safetensors")
        if os.path.isfile(single):
            return {name: "model.safetensors" for name in self._safetensors_keys(single)}
        if os.path.isfile(os.path.join(self.path, "pytorch_model.bin")):
            if not allow_pickle:
                raise ConversionError(f"{self.path} holds a pickled pytorch_model.bin: pass --allow-pickle only if "
                                      "you trust it, or convert it to safetensors first")
            return {name: "pytorch_model.bin" for name in self._load_pickled("pytorch_model.bin")}
        raise ConversionError(f"{self.path} has no model.safetensors[.index.json]: not a Hugging Face checkpoint")

    def _safetensors_keys(self, file: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ConversionError(f"{file} is not a readable safetensors file ({e}): re-download it") from None

    def _load_pickled(self, file: str) -> dict:
        if file not in self._pickled:
            self._pickled[file] = torch.load(os.path.join(self.path, file), map_location="cpu", mmap=True,
                                             weights_only=True)
        return self._pickled[file]

    def read(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file.endswith(".bin"):
            return self._load_pickled(file)[name]
        from safetensors import safe_open

        # Opened per tensor: a kept-open shard stays memory-mapped, and its pages would pile up in this process.
        try:
            with safe_open(os.path.join(self.path, file), framework="pt") as shard:
                return shard.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ConversionError(f"{file}: cannot read {name} ({e}): the shard is corrupted, re-download it") from None


class HFWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` and the index Hugging Face reads."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0  # tensor bytes, the index's total_size (as transformers writes it), not file bytes
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, os.path.join(self.out_dir, f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        total = len(self.shards)
        if total == 1:
            os.replace(os.path.join(self.out_dir, "shard-0.tmp"), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"shard-{i}.tmp"), os.path.join(self.out_dir, final))
            weight_map.update(dict.fromkeys(names, final))
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)


LLAMA2_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}  # without a tokenizer model


def _sentencepiece(tokenizer_model: str):
    from megatron_harpe.data.tokenizer import TokenizerError, load_sentencepiece

    try:
        return load_sentencepiece(tokenizer_model)
    except TokenizerError as e:  # the one message for a bad tokenizer file, under conversion's error type
        raise ConversionError(f"--tokenizer-model {e}") from None


def tokenizer_vocab_size(tokenizer_model: str) -> int:
    return _sentencepiece(tokenizer_model).vocab_size()


def tokenizer_special_ids(tokenizer_model: str) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of a sentencepiece model (its -1 means none: None)."""
    sp = _sentencepiece(tokenizer_model)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id(),
           "unk_token_id": sp.unk_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_hf_config(out_dir: str, shape: LlamaShape, dtype: str, harpe_bases: list[float] | None,
                    special_ids: dict[str, int | None] | None = None) -> None:
    """``config.json`` (``LlamaForCausalLM``, or the HARPE model with ``auto_map``) and ``generation_config.json``.

    The RoPE base and scaling are the shape's (``rope_parameters``: ``default``, ``linear`` or ``yarn``).
    ``special_ids`` (:func:`tokenizer_special_ids`) default to Llama-2's bos 1 / eos 2, no pad.
    """
    from transformers import GenerationConfig, LlamaConfig

    special = {k: v for k, v in (special_ids or LLAMA2_SPECIAL_IDS).items() if k != "unk_token_id"}

    fields = dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
                  num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                  num_key_value_heads=shape.num_query_groups, max_position_embeddings=shape.max_position_embeddings,
                  rms_norm_eps=shape.norm_eps,
                  rope_parameters=hf_rope_parameters(shape.rope_scaling, shape.rope_theta),
                  tie_word_embeddings=False, **special, dtype={"bf16": "bfloat16", "fp16": "float16",
                                                                "fp32": "float32"}[dtype])
    if harpe_bases is None:
        config = LlamaConfig(architectures=["LlamaForCausalLM"], **fields)
    else:
        from megatron_harpe.hf.configuration_harpe_llama import HarpeLlamaConfig

        config = HarpeLlamaConfig(harpe_bases=list(harpe_bases), architectures=["HarpeLlamaForCausalLM"], **fields)
        config.auto_map = {"AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
                           "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM"}
        source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
        for name in HARPE_FILES:  # copyfile: the umask's permissions, not the installed files' (maybe read-only)
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    config.save_pretrained(out_dir)
    GenerationConfig(**special).save_pretrained(out_dir)


def write_hf_tokenizer(out_dir: str, tokenizer_model: str) -> None:
    """Llama's tokenizer files from a sentencepiece ``tokenizer.model`` (transformers converts it to tokenizer.json),
    its special tokens as the model defines them."""
    from transformers import AutoTokenizer

    sp = _sentencepiece(tokenizer_model)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                   "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()),
                   "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False, "legacy": False}, f, indent=2)
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
