import math

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType

from megatron_harpe.attention import SDPAttention, allowed_keys
from test_rotary import FakeGroup
from utils import tiny_config


def attention(heads=4, groups=2, mask_type=AttnMaskType.causal):
    config = tiny_config(num_attention_heads=heads, num_query_groups=groups)
    pgs = ProcessGroupCollection(tp=FakeGroup(0, 1), cp=FakeGroup(0, 1))
    return SDPAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self", pg_collection=pgs)


def plain_attention(q, k, v, allowed):
    """q: [s, b, h, d], k/v: [s, b, g, d], allowed: [b, 1, s, s] or [s, s]; float64 softmax attention."""
    n = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(n, 2).double(), v.repeat_interleave(n, 2).double()
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k) / math.sqrt(q.size(-1))
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(out.size(0), out.size(1), -1)


def qkv(s, b, heads, groups, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, d, generator=g), torch.randn(s, b, groups, d, generator=g),
            torch.randn(s, b, groups, d, generator=g))


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1)])
def test_causal_gqa_matches_plain_attention(heads, groups):
    q, k, v = qkv(12, 2, heads, groups)
    out = attention(heads, groups)(q, k, v, attention_mask=None)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert out.shape == (12, 2, heads * 16)
    torch.testing.assert_close(out.double(), plain_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_user_mask_is_applied_on_top_of_causal():
    q, k, v = qkv(10, 2, 4, 2)
    masked = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    masked[0, :, :, 2] = True  # batch 0 may not look at token 2; True = masked, megatron's convention
    out = attention()(q, k, v, attention_mask=masked)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril() & ~masked
    torch.testing.assert_close(out.double(), plain_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_fewer_queries_than_keys_are_the_last_positions():
    # Decoding against a KV cache: 3 new queries over 10 keys attend causally from positions 7, 8, 9.
    q, k, v = qkv(10, 1, 4, 2)
    out = attention()(q[7:], k, v, attention_mask=None)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[7:]
    torch.testing.assert_close(out.double(), plain_attention(q[7:], k, v, allowed), atol=1e-5, rtol=1e-5)


def test_packed_thd_equals_sequences_run_separately():
    lengths = [5, 3, 8]
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    q, k, v = qkv(16, 1, 4, 2)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    attn = attention()
    packed = attn(q.squeeze(1), k.squeeze(1), v.squeeze(1), attention_mask=None, packed_seq_params=params)
    assert packed.shape == (16, 4 * 16)
    start = 0
    for n in lengths:
        alone = attn(q[start : start + n], k[start : start + n], v[start : start + n], attention_mask=None)
        torch.testing.assert_close(packed[start : start + n], alone.squeeze(1), atol=1e-6, rtol=1e-5)
        start += n


def test_gradients_flow_to_q_k_v():
    q, k, v = (t.requires_grad_() for t in qkv(6, 1, 4, 2))
    attention()(q, k, v, attention_mask=None).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def rows(*lines):
    """A boolean [1, 1, s_q, s_k] mask from strings of 0/1, one per query."""
    return torch.tensor([[int(c) for c in line] for line in lines], dtype=torch.bool)[None, None]


USER_MASK = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
USER_MASK[1, :, :, 0] = True  # batch 1 may not look at token 0

# (case, arguments of allowed_keys, expected allowed mask or None, expected key order or None)
ALLOWED_KEYS = [
    ("causal: SDPA's is_causal", dict(s_q=4, s_k=4, causal=True), None, None),
    ("no mask", dict(s_q=3, s_k=3, causal=False), rows("111", "111", "111"), None),
    ("decoding: the last queries", dict(s_q=2, s_k=4, causal=True), rows("1110", "1111"), None),
    ("packed: per sequence", dict(s_q=5, s_k=5, causal=True, packed=torch.tensor([0, 2, 5])),
     rows("10000", "11000", "00100", "00110", "00111"), None),
    ("packed, not causal", dict(s_q=4, s_k=4, causal=False, packed=torch.tensor([0, 1, 4])),
     rows("1000", "0111", "0111", "0111"), None),
    # CP 2 of 8 positions: rank 0 holds chunks 0 and 3 (0, 1, 6, 7), rank 1 chunks 1 and 2 (2..5).
    ("CP rank 0", dict(s_q=4, s_k=8, causal=True, cp_rank=0, cp_size=2),
     rows("10000000", "11000000", "11111110", "11111111"), [0, 1, 4, 5, 6, 7, 2, 3]),
    ("CP rank 1", dict(s_q=4, s_k=8, causal=True, cp_rank=1, cp_size=2),
     rows("11100000", "11110000", "11111000", "11111100"), [0, 1, 4, 5, 6, 7, 2, 3]),
    # Packed and CP 2: sequences of 4 and 4 tokens; rank 0 holds positions 0, 3 of each, rank 1 positions 1, 2.
    ("packed, CP rank 1", dict(s_q=4, s_k=8, causal=True, packed=torch.tensor([0, 4, 8]), cp_rank=1, cp_size=2),
     rows("11000000", "11100000", "00001100", "00001110"), [0, 4, 5, 1, 2, 6, 7, 3]),
    ("user mask on top of causal", dict(s_q=3, s_k=3, causal=True, attention_mask=USER_MASK),
     torch.stack([rows("100", "110", "111")[0], rows("000", "010", "011")[0]]), None),
]


@pytest.mark.parametrize("case, kwargs, expected, order", ALLOWED_KEYS, ids=[c[0] for c in ALLOWED_KEYS])
def test_allowed_keys(case, kwargs, expected, order):
    allowed, key_order = allowed_keys(**kwargs)
    if expected is None:
        assert allowed is None
    else:
        assert allowed.dtype == torch.bool and torch.equal(allowed, expected), allowed.int()
    assert (key_order is None) if order is None else key_order.tolist() == order
