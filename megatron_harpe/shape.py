"""The one Llama shape: sizes, named presets, reading it from a Hugging Face config or Megatron's args, and
writing it as Megatron flags or a megatron-core ``TransformerConfig``.

Conversion, planning, training, the benchmarks and the launch scripts all take their shape from here. Nothing
at module level imports torch or megatron: ``--help`` and the planner read the presets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING

from megatron_harpe.command import UsageError

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_harpe.convert.rope_scaling import RopeScaling

LLAMA2_VOCAB_SIZE = 32000
VOCAB_DIVISOR = 128  # Megatron-LM's --make-vocab-size-divisible-by default


class ShapeError(UsageError):
    """A shape or a config the tools cannot use; the message says what is wrong (callers may rewrap it)."""


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-style decoder: RMSNorm, RoPE, no biases; SwiGLU unless ``gated=False``, untied unless
    ``tied_embeddings`` (the planner models both variants; conversion maps Llama-2's only). ``rope_scaling``:
    position interpolation or YaRN on top of ``rope_theta`` (read and written by conversion only)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None          # None or 0: one group per head (no GQA)
    vocab_size: int = LLAMA2_VOCAB_SIZE
    kv_channels: int | None = None               # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    gated: bool = True
    tied_embeddings: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        # The one place "no query groups given" becomes "one per head".
        if not self.num_query_groups:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ShapeError(f"{self.name}: {self.num_attention_heads} attention heads do not split into "
                             f"{self.num_query_groups} query groups")

    def with_sizes(self, **changes) -> LlamaShape:
        """This shape with other sizes (``dataclasses.replace`` would keep the head width and the query groups
        derived from the old heads: here they follow the new ones unless given or set apart before)."""
        derived = {}
        if self.kv_channels == self.hidden_size // self.num_attention_heads:
            derived["kv_channels"] = None
        if self.num_query_groups == self.num_attention_heads:
            derived["num_query_groups"] = None
        return replace(self, **{**derived, **changes})

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def key_value_width(self) -> int:
        """K and V together."""
        return 2 * self.num_query_groups * self.kv_channels

    def padded_vocab_size(self, tp: int, divisible_by: int = VOCAB_DIVISOR) -> int:
        """The embedding rows Megatron allocates: its own ``vocab_size_with_padding`` (a multiple of
        ``divisible_by`` x TP)."""
        from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding  # not for --help

        args = SimpleNamespace(make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tp, rank=0)
        return vocab_size_with_padding(self.vocab_size, args, logging_enabled=False)

    # --- parameters, split by how tensor parallelism holds them ------------------------------------------------

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

    # --- layouts -----------------------------------------------------------------------------------------------

    def check_layout(self, tp: int, pp: int) -> None:
        """Refuse a TP/PP this shape cannot be split into."""
        problems = []
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            problems.append(f"TP={tp} must divide the {self.num_attention_heads} heads and the "
                            f"{self.num_query_groups} query groups")
        if self.ffn_hidden_size % tp:
            problems.append(f"TP={tp} must divide the MLP width {self.ffn_hidden_size}")
        if self.num_layers % pp:
            problems.append(f"PP={pp} must divide the {self.num_layers} layers")
        if problems:
            raise ShapeError("; ".join(problems))

    # --- reading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict, path: str = "config.json", *, strict: bool = True) -> LlamaShape:
        """The shape of a Hugging Face ``config.json``. ``strict``: exactly Llama-2's architecture, which the
        converter maps tensor by tensor (refuses other model types, activations, biases, tied embeddings, head
        widths, RoPE scaling megatron has no counterpart for) and reads the RoPE scaling; otherwise any Llama-style
        config the planner can count (gated and tied read, RoPE scaling not)."""
        if strict:
            _require_llama2(config, path)
        sizes = _sizes(config, path, _HF_KEYS)  # before transformers reads the config: our message for a gap
        rope_theta, rope_scaling = _rope(config, path) if strict else (_rope_theta(config), None)
        return cls(**sizes,
                   max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
                   rope_theta=rope_theta, rope_scaling=rope_scaling,
                   norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                   gated=config.get("hidden_act", "silu") in ("silu", "swiglu"),
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)), name=path)

    @classmethod
    def from_megatron_config(cls, config: dict, name: str) -> LlamaShape:
        """A JSON description in Megatron's argument names (``num_layers``, ``ffn_hidden_size``, ``swiglu``, ...)."""
        return cls(**_sizes(config, name, _MEGATRON_KEYS), gated=bool(config.get("swiglu", True)),
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)), name=name)

    @classmethod
    def from_config(cls, config: dict, name: str) -> LlamaShape:
        """A Hugging Face ``config.json`` (read leniently, as the planner does) or a dict in Megatron's names."""
        if "num_hidden_layers" in config:
            return cls.from_hf_config(config, name, strict=False)
        return cls.from_megatron_config(config, name)

    @classmethod
    def from_megatron_args(cls, args, vocab_size: int | None = None, *, strict: bool = True) -> LlamaShape:
        """The shape parsed Megatron-LM arguments (or a checkpoint's saved ones) describe. The true vocabulary
        is ``vocab_size``, else ``args.vocab_size`` (megatron keeps only the padded one when a tokenizer gave it).
        ``strict``: refuse anything but a Llama (SwiGLU, RMSNorm, RoPE with or without position interpolation or
        YaRN, as a Hugging Face Llama can express it) and read the RoPE scaling."""
        vocab = vocab_size or getattr(args, "vocab_size", None)
        padded = getattr(args, "padded_vocab_size", None)
        if not vocab:
            raise ShapeError(f"the checkpoint's args do not record the true vocabulary size (only the padded "
                             f"{padded})")
        if padded and int(vocab) > padded:
            raise ShapeError(f"vocabulary {vocab} is larger than the checkpoint's {padded} embedding rows")
        if strict and (args.position_embedding_type not in ("rope", "yarn") or not args.swiglu
                       or args.normalization != "RMSNorm"):
            raise ShapeError("the checkpoint is not a Llama (RoPE or YaRN, SwiGLU, RMSNorm)")
        rope_scaling = None
        if strict:
            from megatron_harpe.convert.rope_scaling import RopeScaling

            rope_scaling = RopeScaling.from_megatron_args(args)
        # Megatron reads --num-query-groups only with --group-query-attention.
        groups = args.num_query_groups if args.group_query_attention else None
        positions = {} if args.max_position_embeddings is None else dict(
            max_position_embeddings=args.max_position_embeddings)
        return cls(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                   num_attention_heads=args.num_attention_heads, num_query_groups=groups, vocab_size=int(vocab),
                   kv_channels=args.kv_channels, rope_theta=float(args.rotary_base), rope_scaling=rope_scaling,
                   norm_eps=float(args.layernorm_epsilon), gated=bool(args.swiglu),
                   tied_embeddings=not args.untie_embeddings_and_output_weights, name="args", **positions)

    # --- writing -----------------------------------------------------------------------------------------------

    def to_megatron_flags(self) -> list[str]:
        """The sizes as Megatron-LM flags, in the launch scripts' order. Not the vocabulary (the run's tokenizer
        gives it, and conversion passes its own), nor the positions, RoPE base, norm epsilon, SwiGLU and untied
        embeddings: those are the recipe's (examples/llama2_common.sh, recipes)."""
        flags = ["--num-layers", self.num_layers, "--hidden-size", self.hidden_size,
                 "--ffn-hidden-size", self.ffn_hidden_size, "--num-attention-heads", self.num_attention_heads]
        if self.kv_channels != self.hidden_size // self.num_attention_heads:
            flags += ["--kv-channels", self.kv_channels]
        if self.num_query_groups != self.num_attention_heads:
            flags += ["--group-query-attention", "--num-query-groups", self.num_query_groups]
        return [str(f) for f in flags]

    def transformer_config(self, *, tp: int = 1, pp: int = 1, cp: int = 1, params_dtype: torch.dtype | None = None,
                           cpu: bool | None = None, **overrides) -> TransformerConfig:
        """A megatron-core config for this decoder; ``params_dtype`` defaults to float32, ``cpu`` (default: no
        CUDA) turns off CUDA-only fusions."""
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        params_dtype = params_dtype or torch.float32
        if cpu is None:
            cpu = not torch.cuda.is_available()
        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=self.gated,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=cpu,
        )
        if cpu:
            fields.update(
                bias_activation_fusion=False,
                bias_dropout_fusion=False,
                masked_softmax_fusion=False,
                gradient_accumulation_fusion=False,
                persist_layer_norm=False,
                apply_rope_fusion=False,
            )
        fields.update(overrides)
        return TransformerConfig(**fields)


# Llama-2 (Touvron et al. 2023); 70B uses GQA with 8 query groups. tiny: small enough for CPU tests and demos
# (GQA: 4 heads in 2 groups). Named SHAPES, not PRESETS: bases.PRESETS are base lists.
SHAPES: dict[str, LlamaShape] = {
    "7b": LlamaShape(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, name="7b"),
    "13b": LlamaShape(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, name="13b"),
    "70b": LlamaShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                      num_query_groups=8, name="70b"),
    "tiny": LlamaShape(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       name="tiny"),
}
LLAMA2_MODELS = ("7b", "13b", "70b")


def resolve_model(spec: str) -> LlamaShape:
    """A preset name (7b, 13b, 70b, tiny) or the path of a config.json (:meth:`LlamaShape.from_config`)."""
    if spec.lower() in SHAPES:
        return SHAPES[spec.lower()]
    if not os.path.isfile(spec):
        raise ShapeError(f"--model {spec!r}: choose {', '.join(LLAMA2_MODELS)} or the path of a config.json (or tiny, "
                         "the CPU tests' model)")
    try:
        with open(spec) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShapeError(f"--model {spec}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ShapeError(f"--model {spec}: expected a JSON object")
    return LlamaShape.from_config(config, spec)


# Field -> key of a Hugging Face LlamaConfig, then of a Megatron-style description.
_HF_KEYS = dict(num_layers="num_hidden_layers", hidden_size="hidden_size", num_attention_heads="num_attention_heads",
                num_query_groups="num_key_value_heads", ffn_hidden_size="intermediate_size", vocab_size="vocab_size",
                kv_channels="head_dim")
_MEGATRON_KEYS = dict(num_layers="num_layers", hidden_size="hidden_size", num_attention_heads="num_attention_heads",
                      num_query_groups="num_query_groups", ffn_hidden_size="ffn_hidden_size", vocab_size="vocab_size",
                      kv_channels="kv_channels")
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def _sizes(config: dict, name: str, keys: dict[str, str]) -> dict:
    missing = [keys[k] for k in _REQUIRED if config.get(keys[k]) is None]
    if missing:
        raise ShapeError(f"{name}: missing {', '.join(missing)}; give a Hugging Face Llama config.json "
                         f"(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, ...) or Megatron "
                         f"names (num_layers, hidden_size, num_attention_heads, ffn_hidden_size, num_query_groups, "
                         f"vocab_size)")
    values = {f: config.get(key) for f, key in keys.items() if config.get(key) is not None}
    values.setdefault("vocab_size", LLAMA2_VOCAB_SIZE)
    try:
        return {k: int(v) for k, v in values.items()}
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{name}: shape values must be integers ({e})") from None


def _require_llama2(config: dict, path: str) -> None:
    model_type = config.get("model_type")
    if model_type not in ("llama", "harpe_llama"):
        raise ShapeError(f"{path}: model_type {model_type!r} is not a Llama (Llama-2 checkpoints say 'llama')")
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (Llama uses silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("biases (Llama has none)")
    if config.get("tie_word_embeddings"):
        problems.append("tied input and output embeddings (Llama-2 unties them)")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if heads and hidden and config.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {config['head_dim']} != hidden_size / heads")
    if problems:
        raise ShapeError(f"{path}: unsupported {', '.join(problems)}")


def _rope_theta(config: dict) -> float:
    """The RoPE base, read leniently (the planner's configs; no transformers import)."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope(config: dict, path: str) -> tuple[float, RopeScaling | None]:
    """The RoPE base and scaling of a config.json, from transformers' own reading of it (legacy ``rope_scaling``,
    ``type`` and a top-level ``rope_theta`` included)."""
    import copy

    from transformers import LlamaConfig

    from megatron_harpe.convert.rope_scaling import RopeScaling

    try:
        params = LlamaConfig(**copy.deepcopy(config)).rope_parameters  # LlamaConfig edits the dicts it is given
    except (ValueError, TypeError) as e:  # transformers validates every field
        raise ShapeError(f"{path}: transformers does not read it as a Llama config ({e})") from None
    if any(isinstance(v, dict) for v in params.values()):
        raise ShapeError(f"{path}: RoPE parameters per layer type: a Llama has one")
    return float(params["rope_theta"]), RopeScaling.from_hf(params, path)
