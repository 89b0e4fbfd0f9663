"""Hugging Face Llama checkpoints: read lazily (safetensors); written as safetensors shards laid out before the
first tensor arrives, with the index, config and tokenizer."""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

from megatron_harpe.convert.file_io import pwrite_all, tensor_bytes
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


def hf_tensor_shape(name: str, shape: LlamaShape) -> tuple[int, ...]:
    """The shape config.json gives the Hugging Face tensor ``name`` (a name of the mapping's tables)."""
    h, ffn, q, kv = shape.hidden_size, shape.ffn_hidden_size, shape.query_width, shape.key_value_width // 2
    shapes = {"embed_tokens": (shape.vocab_size, h), "lm_head": (shape.vocab_size, h), "q_proj": (q, h),
              "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (ffn, h), "up_proj": (ffn, h),
              "down_proj": (h, ffn), "norm": (h,), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    return shapes[name.rsplit(".", 2)[-2]]


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class HFWriter:
    """Safetensors shards of at most ``max_shard_bytes`` and the index Hugging Face reads, laid out before any
    tensor arrives: each shard's header is written and its size set first, and each tensor goes into its place
    when it comes (in any order), so no shard is held in memory (safetensors' save_file takes a whole file's
    tensors at once: with 5 GB shards the largest buffer of a 70B export). A context manager: its files close
    on the way out; :meth:`finish` names them and writes the index."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 2**30):
        self.out_dir, self.dtype = out_dir, dtype
        size = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        shard_bytes = self.total_bytes = 0  # total: the index's total_size, tensor bytes (not file bytes)
        for name, tensor_shape in tensors:
            nbytes = size * math.prod(tensor_shape)
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tensor_shape))
            shard_bytes += nbytes
            self.total_bytes += nbytes
        self.shards = [[name for name, _ in shard] for shard in shards]
        self.slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # name -> (file, byte offset, shape)
        self.fds: list[int] = []
        try:
            self._lay_out(shards, size)
        except BaseException:  # a full disk while laying out: no descriptor left open
            self.__exit__()
            raise

    def _lay_out(self, shards: list[list[tuple[str, tuple[int, ...]]]], size: int) -> None:
        """Each shard's file: its header, its size set (sparse until filled), its tensors' slots."""
        for i, shard in enumerate(shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, tensor_shape in shard:
                end = offset + size * math.prod(tensor_shape)
                header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(tensor_shape),
                                "data_offsets": [offset, end]}
                offset = end
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
            fd = os.open(self._temp(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self.fds.append(fd)
            pwrite_all(fd, memoryview(len(encoded).to_bytes(8, "little") + encoded), 0)
            os.ftruncate(fd, 8 + len(encoded) + offset)
            for name, tensor_shape in shard:
                self.slots[name] = (fd, 8 + len(encoded) + header[name]["data_offsets"][0], tensor_shape)

    def _temp(self, i: int) -> str:
        return os.path.join(self.out_dir, f"shard-{i}.tmp")

    def __enter__(self) -> HFWriter:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.slots:
            raise ConversionError(f"{name}: not a tensor of this model, or given twice")
        fd, offset, expected = self.slots.pop(name)
        if tuple(tensor.shape) != expected or tensor.dtype != self.dtype:
            raise ConversionError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, the checkpoint's sizes give "
                                  f"{expected} {self.dtype}: the checkpoint does not match its args")
        pwrite_all(fd, tensor_bytes(tensor), offset)

    def finish(self) -> None:
        if self.slots:
            raise ConversionError(f"{len(self.slots)} tensors never came (first: {next(iter(self.slots))}): the "
                                  "checkpoint is incomplete")
        self.__exit__()
        total = len(self.shards)
        if total == 1:
            os.replace(self._temp(0), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self._temp(i), os.path.join(self.out_dir, final))
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
