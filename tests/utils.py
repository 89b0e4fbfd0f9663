"""Shared test helpers: a tiny Llama-shaped HARPE model, data, and a plain reference written from scratch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron.core import parallel_state

from megatron_harpe import HarpeGPTModel, harpe_layer_spec
from megatron_harpe.shape import SHAPES

VOCAB = 128
TINY_BASES = [1.0e4, 2.5e5]  # one per query group of SHAPES['tiny'] (2 groups); far apart on purpose


SIZES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")


def tiny_config(tp=1, pp=1, cp=1, **overrides):
    """The tiny preset's TransformerConfig; size overrides (``num_layers=4``) change the shape first."""
    sizes = {k: overrides.pop(k) for k in list(overrides) if k in SIZES}
    return SHAPES["tiny"].with_sizes(**sizes).transformer_config(tp=tp, pp=pp, cp=cp, **overrides)


def tiny_model(config=None, bases=TINY_BASES, seed=1234, **kwargs):
    config = config or tiny_config()
    torch.manual_seed(seed)
    pp_first = parallel_state.is_pipeline_first_stage() if parallel_state.model_parallel_is_initialized() else True
    pp_last = parallel_state.is_pipeline_last_stage() if parallel_state.model_parallel_is_initialized() else True
    kwargs.setdefault("pre_process", pp_first)
    kwargs.setdefault("post_process", pp_last)
    return HarpeGPTModel(config, harpe_layer_spec("local"), vocab_size=VOCAB, max_sequence_length=4096,
                         harpe_bases=bases, **kwargs)


def tokens(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


# ----------------------------------------------------------------------------------------------------------
# Plain references, independent of megatron and of megatron_harpe.rotary.


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float, rot_dim: int, interleaved: bool):
    """Standard RoPE for one head, as complex rotation in float64. x: [s, d]."""
    x = x.double()
    rot, rest = x[:, :rot_dim], x[:, rot_dim:]
    half = rot_dim // 2
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angle = positions.double()[:, None] * inv[None, :]
    if interleaved:
        pairs = torch.complex(rot[:, 0::2], rot[:, 1::2])
    else:
        pairs = torch.complex(rot[:, :half], rot[:, half:])
    turned = pairs * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        out = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((out, rest), dim=-1)


def per_head_rope_reference(x, positions, head_bases, rot_dim, interleaved=False):
    """x: [s, b, h, d]; head h rotated with head_bases[h], one head at a time."""
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.size(1)):
        for h in range(x.size(2)):
            out[:, b, h] = rope_reference(x[:, b, h], positions, head_bases[h], rot_dim, interleaved)
    return out


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_llama_logits(params: dict, ids: torch.Tensor, config, bases) -> torch.Tensor:
    """A Llama forward written from scratch in float64 with one RoPE base per query group.

    ``params`` are a TP=1/PP=1 megatron model's parameters by name. Megatron's fused QKV is
    [q_1..q_n, k, v] per group; query head j belongs to group j // n.
    """
    p = {k: v.double() for k, v in params.items()}
    d = config.kv_channels
    groups = config.num_query_groups
    n = config.num_attention_heads // groups
    eps = config.layernorm_epsilon
    b, s = ids.shape
    positions = torch.arange(s)
    h = p["embedding.word_embeddings.weight"][ids]  # [b, s, H]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(config.num_layers):
        pre = f"decoder.layers.{i}."
        x = _rms(h, p[pre + "input_layernorm.weight"], eps)
        qkv = (x @ p[pre + "self_attention.linear_qkv.weight"].T).view(b, s, groups, n + 2, d)
        q, k, v = qkv[..., :n, :].reshape(b, s, groups * n, d), qkv[..., n, :], qkv[..., n + 1, :]
        q = torch.stack([torch.stack([rope_reference(q[bi, :, j], positions, bases[j // n], d, False)
                                      for j in range(groups * n)], 1) for bi in range(b)])
        k = torch.stack([torch.stack([rope_reference(k[bi, :, g], positions, bases[g], d, False)
                                      for g in range(groups)], 1) for bi in range(b)])
        k, v = k.repeat_interleave(n, dim=2), v.repeat_interleave(n, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        att = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)
        h = h + att @ p[pre + "self_attention.linear_proj.weight"].T
        x = _rms(h, p[pre + "pre_mlp_layernorm.weight"], eps)
        gate, up = (x @ p[pre + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ p[pre + "mlp.linear_fc2.weight"].T
    h = _rms(h, p["decoder.final_layernorm.weight"], eps)
    return h @ p["output_layer.weight"].T


# Megatron-LM flags for a tiny model on mock data (the parse-only tests of megatron_harpe.training).
TINY_ARGV = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
             "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2", "--lr", "1e-3",
             "--train-iters", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
             "--position-embedding-type", "rope"]
