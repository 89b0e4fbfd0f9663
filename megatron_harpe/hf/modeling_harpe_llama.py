"""HARPE Llama for transformers (Lian et al. 2024, arXiv 2412.07171): Llama with one RoPE base per query group.

Everything is transformers' Llama except the rotary embedding: cos/sin are computed per key/value head from that
head's base (angles ``position * inv_freq`` in float32, as Megatron computes them; with ``rope_type: linear``
positions are first multiplied by ``1 / factor``, Megatron's position interpolation), and every query head uses the
table of its group, as megatron-harpe trains it. Load with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

import torch
import transformers
from torch import nn

# The attention below is transformers 5.24's: ``AttentionInterface.get_interface`` and the ``cache=`` argument
# (5.0-5.23 pass ``past_key_values=``, which this code would silently not update: generation would go wrong).
NEEDS_TRANSFORMERS = (5, 24)


def _require_transformers() -> None:
    version = transformers.__version__
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:  # a development version: trust it
        return
    if found < NEEDS_TRANSFORMERS:
        raise ImportError(f"this HARPE Llama model needs transformers>=5.24,<6 (found {version}): "
                          "pip install 'transformers>=5.24,<6'")


_require_transformers()

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
    rotate_half,
)

from .configuration_harpe_llama import HarpeLlamaConfig  # noqa: E402


class HarpeLlamaRotaryEmbedding(nn.Module):
    """``(cos, sin)`` of shape ``[batch, groups, seq, head_dim]``: one row of frequencies per query group."""

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__()
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.bases = [float(base) for base in config.harpe_bases]
        params = config.rope_parameters or {}
        self.interpolation = float(params["factor"]) if params.get("rope_type") == "linear" else None

    def inverse_frequencies(self, device) -> torch.Tensor:
        """``[groups, head_dim / 2]``, recomputed per call (a few hundred numbers): from_pretrained builds models on
        the meta device and would leave a non-persistent buffer uninitialized."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return torch.stack([1.0 / (base ** exponents) for base in self.bases])

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq = self.inverse_frequencies(x.device)
        positions = position_ids.float()
        if self.interpolation is not None:  # Megatron's order: positions * (1 / factor), then the frequencies
            positions = positions * (1 / self.interpolation)
        freqs = positions[:, None, :, None] * inv_freq[None, :, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_harpe_rotary_pos_emb(q, k, cos, sin):
    """q ``[b, heads, s, d]``, k ``[b, groups, s, d]``; query head ``i`` rotates with group ``i // (heads/groups)``."""
    repeat = q.shape[1] // k.shape[1]
    cos_q, sin_q = cos.repeat_interleave(repeat, dim=1), sin.repeat_interleave(repeat, dim=1)
    return q * cos_q + rotate_half(q) * sin_q, k * cos + rotate_half(k) * sin


class HarpeLlamaAttention(LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_harpe_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class HarpeLlamaModel(LlamaModel):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__(config)
        self.rotary_emb = HarpeLlamaRotaryEmbedding(config)
        for index, layer in enumerate(self.layers):
            attention = HarpeLlamaAttention(config, index)
            attention.load_state_dict(layer.self_attn.state_dict())
            layer.self_attn = attention


class HarpeLlamaForCausalLM(LlamaForCausalLM):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__(config)
        self.model = HarpeLlamaModel(config)
        self.post_init()


__all__ = ["HarpeLlamaConfig", "HarpeLlamaForCausalLM", "HarpeLlamaModel"]
