"""HarpeGPTModel / HarpeHybridModel and their layer specs.

A HARPE model is megatron-core's own model with two swaps: the RoPE provider
(:class:`~megatron_harpe.rotary.HarpeRotaryEmbedding`, one base per query group) and, through the
spec, the self-attention module (:class:`~megatron_harpe.self_attention.HarpeSelfAttention`, which keeps
per-head frequencies away from fused RoPE kernels). The ``local`` spec also swaps the core attention
for :class:`~megatron_harpe.attention.SDPAttention` so that the model runs on a CPU.

The RoPE path (``harpe_rope_impl``) is fixed before megatron builds anything: the provider is constructed with
it and the spec given to the model gets it in every HARPE attention's ``ModuleSpec.params``. The same reading of
the spec finds megatron's plain attention, which is refused unless it can run (the unfused path, fusion off).
A plain ``GPTModel`` built with :func:`harpe_layer_spec` is megatron's model with standard RoPE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_harpe.attention import SDPAttention
from megatron_harpe.bases import validate_bases
from megatron_harpe.rotary import HarpeRotaryEmbedding, check_groups_divisible, check_rope_impl
from megatron_harpe.self_attention import HarpeSelfAttention

IMPLS = ("auto", "te", "local")


def have_te() -> bool:
    """Transformer Engine importable (read at call time: tests may patch megatron's flag)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return HAVE_TE


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``te`` when Transformer Engine and a GPU are present, else ``local``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown layer implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "te" if have_te() and torch.cuda.is_available() else "local"
    if impl == "te" and not have_te():
        raise ValueError("impl='te' needs Transformer Engine, which is not installed: use impl='local' "
                         "(CPU-capable) or run in NVIDIA's PyTorch container")
    return impl


def _layer_submodules(impl: str, normalization: str, qk_layernorm: bool) -> TransformerLayerSubmodules:
    """megatron's own GPT layer submodules; ``local`` with the CPU-capable SDPA core attention."""
    if resolve_impl(impl) == "te":
        return get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=qk_layernorm)
    layer = get_gpt_layer_local_submodules(normalization=normalization, qk_layernorm=qk_layernorm)
    attention = dataclasses.replace(
        layer.self_attention,
        submodules=dataclasses.replace(layer.self_attention.submodules, core_attention=SDPAttention),
    )
    return dataclasses.replace(layer, self_attention=attention)


def _harpe_layer_submodules(impl: str, normalization: str, qk_layernorm: bool) -> TransformerLayerSubmodules:
    layer = _layer_submodules(impl, normalization, qk_layernorm)
    return dataclasses.replace(layer, self_attention=dataclasses.replace(layer.self_attention, module=HarpeSelfAttention))


def standard_layer_spec(impl: str = "auto", *, normalization: str = "RMSNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """The same layer without HARPE (megatron's SelfAttention, standard RoPE): for baselines and comparisons.

    ``te`` is megatron's Transformer Engine spec unchanged; ``local`` is megatron's local spec with
    :class:`~megatron_harpe.attention.SDPAttention`, so plain ``GPTModel`` runs on a CPU too.
    """
    return ModuleSpec(module=TransformerLayer, submodules=_layer_submodules(impl, normalization, qk_layernorm))


def harpe_layer_spec(impl: str = "auto", *, normalization: str = "RMSNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """Llama-style GPT layer spec with HARPE attention.

    ``te``: megatron's Transformer Engine spec (GPUs). ``local``: megatron's local spec with the SDPA core
    attention (any device, TP/PP/CP, packed sequences). ``auto`` picks ``te`` when it can run.
    ``normalization`` applies to the local spec; the TE spec reads ``config.normalization``.
    """
    return ModuleSpec(module=TransformerLayer, submodules=_harpe_layer_submodules(impl, normalization, qk_layernorm))


class LocalNormHybridStack(HybridStack):
    """megatron's HybridStack with its final norm built from the local spec.

    HybridStack hard-codes Transformer Engine's ``TENorm`` for the final norm; everything else comes from
    the spec. This builds the stack without it and adds the local norm (same ``final_norm`` name, same
    ``forward``), so the ``local`` hybrid spec runs where TE does not.
    """

    def __init__(self, config: TransformerConfig, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = WrappedTorchNorm(config=config, hidden_size=config.hidden_size,
                                               eps=config.layernorm_epsilon)


def harpe_hybrid_stack_spec(impl: str = "auto", *, normalization: str = "RMSNorm") -> ModuleSpec:
    """HybridStack spec for attention (``*``) and MLP (``-``) layers, with HARPE attention.

    Built from the same submodules as :func:`harpe_layer_spec`, split into an attention-only layer and an
    MLP-only layer, so a GPT layer ``i`` corresponds to hybrid layers ``2i`` (``*``) and ``2i+1`` (``-``).
    """
    layer = _harpe_layer_submodules(impl, normalization, qk_layernorm=False)
    attention_layer = TransformerLayerSubmodules(
        input_layernorm=layer.input_layernorm,
        self_attention=layer.self_attention,
        self_attn_bda=layer.self_attn_bda,
        sharded_state_dict_keys_map={
            k: v for k, v in layer.sharded_state_dict_keys_map.items() if k.startswith("input_layernorm")
        },
    )
    mlp_layer = TransformerLayerSubmodules(
        pre_mlp_layernorm=layer.pre_mlp_layernorm,
        mlp=layer.mlp,
        mlp_bda=layer.mlp_bda,
        sharded_state_dict_keys_map={
            k: v for k, v in layer.sharded_state_dict_keys_map.items() if not k.startswith("input_layernorm")
        },
    )
    return ModuleSpec(
        module=HybridStack if resolve_impl(impl) == "te" else LocalNormHybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention_layer),
            mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp_layer),
        ),
    )


def _check_harpe_args(config: TransformerConfig, bases: Sequence[float], rope_impl: str,
                      position_embedding_type: str, rope_scaling: bool) -> list[float]:
    """Validate before megatron builds anything; return the bases as floats."""
    if position_embedding_type != "rope":
        raise ValueError(f"HARPE is a RoPE variant: position_embedding_type must be 'rope', got {position_embedding_type!r}")
    if rope_scaling:
        raise ValueError("rope_scaling (Llama-3 frequency scaling) cannot be combined with HARPE bases; drop it")
    check_rope_impl(rope_impl)
    groups = config.num_query_groups or config.num_attention_heads
    # Megatron itself accepts TP > groups (it replicates K/V); HARPE needs whole groups, said before anything is built.
    check_groups_divisible(groups, config.tensor_model_parallel_size)
    return validate_bases(bases, groups)


def _spec_module(spec):
    """The class a spec entry builds (a ModuleSpec, possibly naming its class by import path, or a bare class)."""
    module = spec.module if isinstance(spec, ModuleSpec) else spec
    return import_module(module) if isinstance(module, tuple) else module


def _with_rope_impl(spec, rope_impl: str, plain: list[str], where: str):
    """``spec`` with ``rope_impl`` in the ``params`` of every HarpeSelfAttention; megatron's own attentions go to ``plain``.

    A new spec where anything changes (``dataclasses.replace``), ``spec`` itself where nothing does.
    """
    if isinstance(spec, (ModuleSpec, type)):
        module = _spec_module(spec)
        if isinstance(module, type) and issubclass(module, HarpeSelfAttention):
            spec = spec if isinstance(spec, ModuleSpec) else ModuleSpec(module=spec)
            spec = dataclasses.replace(spec, params={**spec.params, "rope_impl": rope_impl})
        elif isinstance(module, type) and issubclass(module, Attention):
            plain.append(f"{where} ({module.__name__})")
        if not isinstance(spec, ModuleSpec):
            return spec
        submodules = _with_rope_impl(spec.submodules, rope_impl, plain, where)
        return spec if submodules is spec.submodules else dataclasses.replace(spec, submodules=submodules)
    if dataclasses.is_dataclass(spec):  # megatron's *Submodules
        changes = {}
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            new = _with_rope_impl(value, rope_impl, plain, f"{where}.{f.name}")
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(spec, **changes) if changes else spec
    if isinstance(spec, (list, tuple)):  # TransformerBlockSubmodules.layer_specs
        new = [_with_rope_impl(s, rope_impl, plain, f"{where}[{i}]") for i, s in enumerate(spec)]
        return spec if all(a is b for a, b in zip(new, spec)) else type(spec)(new)
    return spec


def _rope_fusion_error(where: str) -> ValueError:
    return ValueError(
        f"{where} is megatron's plain attention: with apply_rope_fusion / fused_single_qkv_rope it would hand "
        f"per-head frequencies to Transformer Engine's fused RoPE, which reads one frequency row per position for all "
        f"heads (silently wrong). Build the model with harpe_layer_spec(...) / harpe_hybrid_stack_spec(...), or keep "
        f"apply_rope_fusion=False and fused_single_qkv_rope=False"
    )


def _harpe_spec(spec, config: TransformerConfig, rope_impl: str, name: str):
    """The layer/stack spec with the RoPE path in every HARPE attention's params; megatron's plain attention refused.

    Returns ``(spec, plain attentions)``. A plain attention can take megatron's unfused frequency pair only, and
    reads the fusion flags at forward time (see ``_HarpeRope.forward``).
    """
    plain: list[str] = []
    spec = _with_rope_impl(spec, rope_impl, plain, name)
    if plain and (rope_impl != "unfused" or config.apply_rope_fusion or config.fused_single_qkv_rope):
        raise ValueError(
            f"{plain[0]} is megatron's plain attention: it cannot take HARPE's kernel inputs "
            f"(harpe_rope_impl={rope_impl!r}), and with apply_rope_fusion / fused_single_qkv_rope it would hand "
            f"per-head frequencies to Transformer Engine's fused RoPE, which reads one frequency row per position "
            f"for all heads (silently wrong). Build the model with harpe_layer_spec(...) / "
            f"harpe_hybrid_stack_spec(...), or pass harpe_rope_impl='unfused' with apply_rope_fusion=False and "
            f"fused_single_qkv_rope=False"
        )
    return spec, plain


class _HarpeRope:
    """What both HARPE models add to megatron's: HARPE's RoPE provider, and the fusion check before a forward."""

    def _install_harpe_rope(self, config: TransformerConfig, bases: list[float], rotary_percent: float,
                            seq_len_interpolation_factor: float | None, rope_impl: str, plain: list[str]) -> None:
        self.harpe_bases, self.harpe_rope_impl, self._plain_attention = bases, rope_impl, plain
        self.rotary_pos_emb = HarpeRotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=rotary_percent,
            bases=bases,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            rotary_interleaved=config.rotary_interleaved,
            seq_len_interpolation_factor=seq_len_interpolation_factor,
            tp_group=self.pg_collection.tp,
            cp_group=self.pg_collection.cp,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device(),
            rope_impl=rope_impl,
        )

    def forward(self, *args, **kwargs):
        # megatron's plain attention reads the fusion flags at forward time, from the model's shared config.
        if self._plain_attention and (self.config.apply_rope_fusion or self.config.fused_single_qkv_rope):
            raise _rope_fusion_error(self._plain_attention[0])
        return super().forward(*args, **kwargs)


class HarpeGPTModel(_HarpeRope, GPTModel):
    """megatron-core ``GPTModel`` with HARPE RoPE: ``harpe_bases`` holds one base per query group.

    Same constructor as ``GPTModel`` (``position_embedding_type`` is ``rope``); build it with
    :func:`harpe_layer_spec`. ``harpe_rope_impl`` selects how RoPE is applied: ``auto`` (Triton kernel on
    CUDA, torch kernel elsewhere), ``torch``, ``triton``, or ``unfused`` (megatron's own unfused RoPE with
    materialized per-head frequencies, for comparison); see :mod:`megatron_harpe.self_attention`. It is
    given to the RoPE provider and, through the layer spec's ``ModuleSpec.params``, to every HARPE attention,
    before megatron builds them.
    """

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, *args, harpe_bases: Sequence[float], harpe_rope_impl: str = "auto",
                 position_embedding_type: str = "rope", rotary_percent: float = 1.0,
                 seq_len_interpolation_factor: float | None = None, rope_scaling: bool = False, **kwargs):
        bases = _check_harpe_args(config, harpe_bases, harpe_rope_impl, position_embedding_type, rope_scaling)
        transformer_layer_spec, plain = _harpe_spec(transformer_layer_spec, config, harpe_rope_impl,
                                                    "transformer_layer_spec")
        if kwargs.get("mtp_block_spec") is not None:
            kwargs["mtp_block_spec"], plain_mtp = _harpe_spec(kwargs["mtp_block_spec"], config, harpe_rope_impl,
                                                              "mtp_block_spec")
            plain += plain_mtp
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, *args,
                         position_embedding_type="rope", rotary_percent=rotary_percent,
                         seq_len_interpolation_factor=seq_len_interpolation_factor, **kwargs)
        self._install_harpe_rope(config, bases, rotary_percent, seq_len_interpolation_factor, harpe_rope_impl, plain)


class HarpeHybridModel(_HarpeRope, HybridModel):
    """megatron-core ``HybridModel`` (attention ``*`` / MLP ``-`` patterns) with HARPE RoPE.

    Build it with :func:`harpe_hybrid_stack_spec`; ``harpe_rope_impl`` as in :class:`HarpeGPTModel`.
    """

    def __init__(self, config: TransformerConfig, hybrid_stack_spec, vocab_size: int, max_sequence_length: int,
                 *args, harpe_bases: Sequence[float], harpe_rope_impl: str = "auto", position_embedding_type: str = "rope",
                 rotary_percent: float = 1.0, seq_len_interpolation_factor: float | None = None, **kwargs):
        bases = _check_harpe_args(config, harpe_bases, harpe_rope_impl, position_embedding_type, False)
        hybrid_stack_spec, plain = _harpe_spec(hybrid_stack_spec, config, harpe_rope_impl, "hybrid_stack_spec")
        super().__init__(config, hybrid_stack_spec, vocab_size, max_sequence_length, *args,
                         position_embedding_type="rope", rotary_percent=rotary_percent,
                         seq_len_interpolation_factor=seq_len_interpolation_factor, **kwargs)
        self._install_harpe_rope(config, bases, rotary_percent, seq_len_interpolation_factor, harpe_rope_impl, plain)
