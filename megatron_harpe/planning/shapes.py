"""A decoder's shape for planning: Llama-2 presets, a Hugging Face or Megatron-style config.json, parameter counts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

from megatron_harpe.configs import LLAMA2_SHAPES, LLAMA2_VOCAB_SIZE

# Megatron-LM's --make-vocab-size-divisible-by default.
VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class ModelShape:
    """Llama-style decoder: RMSNorm, no biases, untied embeddings, RoPE; SwiGLU unless ``gated=False``."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int = LLAMA2_VOCAB_SIZE
    kv_channels: int | None = None
    gated: bool = True
    tied_embeddings: bool = False

    def __post_init__(self):
        if self.kv_channels is None:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"{self.name}: {self.num_attention_heads} attention heads do not split into "
                             f"{self.num_query_groups} query groups")

    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def key_value_width(self) -> int:
        """K and V together."""
        return 2 * self.num_query_groups * self.kv_channels

    def padded_vocab_size(self, tp: int) -> int:
        """The vocabulary as Megatron pads it: a multiple of 128 x TP (its own ``vocab_size_with_padding``)."""
        from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding  # not for --help

        args = SimpleNamespace(make_vocab_size_divisible_by=VOCAB_DIVISOR, tensor_model_parallel_size=tp, rank=0)
        return vocab_size_with_padding(self.vocab_size, args, logging_enabled=False)

    # Parameters, split by how tensor parallelism holds them.
    def layer_sharded_parameters(self) -> int:
        """Per layer, split over TP ranks: QKV, output projection, MLP."""
        h = self.hidden_size
        attention = h * (self.query_width + self.key_value_width) + self.query_width * h
        mlp = (3 if self.gated else 2) * h * self.ffn_hidden_size
        return attention + mlp

    def layer_replicated_parameters(self) -> int:
        """Per layer, on every TP rank: the two RMSNorm weights."""
        return 2 * self.hidden_size

    def embedding_parameters(self, tp: int) -> int:
        """One of the word embedding / output layer (padded vocabulary x hidden), split over TP ranks."""
        return self.padded_vocab_size(tp) * self.hidden_size

    def total_parameters(self, tp: int = 1) -> int:
        embeddings = (1 if self.tied_embeddings else 2) * self.embedding_parameters(tp)
        per_layer = self.layer_sharded_parameters() + self.layer_replicated_parameters()
        return self.num_layers * per_layer + embeddings + self.hidden_size


PRESETS = {name: ModelShape(name=name, **shape) for name, shape in LLAMA2_SHAPES.items()}

# Keys of a Hugging Face LlamaConfig, then of a Megatron-style description (our own configs' names).
_HF_KEYS = dict(num_layers="num_hidden_layers", hidden_size="hidden_size", num_attention_heads="num_attention_heads",
                num_query_groups="num_key_value_heads", ffn_hidden_size="intermediate_size", vocab_size="vocab_size",
                kv_channels="head_dim")
_MEGATRON_KEYS = dict(num_layers="num_layers", hidden_size="hidden_size", num_attention_heads="num_attention_heads",
                      num_query_groups="num_query_groups", ffn_hidden_size="ffn_hidden_size", vocab_size="vocab_size",
                      kv_channels="kv_channels")


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A Hugging Face ``config.json`` (Llama-style) or a dict with Megatron's names (``num_layers``, ...)."""
    keys = _HF_KEYS if "num_hidden_layers" in config else _MEGATRON_KEYS
    required = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
    missing = [keys[k] for k in required if config.get(keys[k]) is None]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)}; give a Hugging Face Llama config.json (num_hidden_layers, "
                         f"hidden_size, num_attention_heads, intermediate_size, ...) or Megatron names (num_layers, "
                         f"hidden_size, num_attention_heads, ffn_hidden_size, num_query_groups, vocab_size)")
    values = {field: config.get(key) for field, key in keys.items()}
    values["num_query_groups"] = values["num_query_groups"] or values["num_attention_heads"]
    values["vocab_size"] = values["vocab_size"] or LLAMA2_VOCAB_SIZE
    if values["kv_channels"] is None:
        values.pop("kv_channels")
    try:
        values = {k: int(v) for k, v in values.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: shape values must be integers ({e})") from None
    tied = bool(config.get("tie_word_embeddings", False))
    gated = config.get("hidden_act", "silu") in ("silu", "swiglu") if keys is _HF_KEYS else config.get("swiglu", True)
    return ModelShape(name=name, gated=gated, tied_embeddings=tied, **values)


def resolve_model(spec: str) -> ModelShape:
    """``7b``, ``13b``, ``70b`` or the path of a config.json."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    if not os.path.isfile(spec):
        raise ValueError(f"--model {spec!r}: choose {', '.join(PRESETS)} or the path of a config.json")
    try:
        with open(spec) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {spec}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {spec}: expected a JSON object")
    return shape_from_config(config, spec)
