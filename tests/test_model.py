import itertools
import os
import subprocess
import sys

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harpe import positions as positions_module
from megatron_harpe import self_attention
from megatron_harpe import HarpeGPTModel, HarpeHybridModel, harpe_hybrid_stack_spec, harpe_layer_spec
from megatron_harpe.model import standard_layer_spec
from megatron_harpe.attention import SDPAttention
from megatron_harpe.cpu_compat import megatron_on_cpu
from megatron_harpe.kernels.saved_bytes import saved_bytes
from utils import TINY_BASES, VOCAB, reference_llama_logits, tiny_config, tiny_model, tokens

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_logits_match_a_plain_per_group_rope_llama():
    config = tiny_config()
    model = tiny_model(config).eval()
    ids = tokens(2, 20)
    logits = model(ids, None, None)
    expected = reference_llama_logits(params_of(model), ids, config, TINY_BASES)
    torch.testing.assert_close(logits.double(), expected, atol=2e-5, rtol=1e-4)


def plain_gpt(config, base, spec=None):
    """megatron's own GPTModel with standard RoPE and the same CPU core attention."""
    torch.manual_seed(1234)
    return GPTModel(config, spec or standard_layer_spec("local"), vocab_size=VOCAB, max_sequence_length=4096,
                    position_embedding_type="rope", rotary_base=base)


def test_equal_bases_reproduce_megatron_standard_rope_exactly():
    config = tiny_config()
    standard = plain_gpt(config, 10000).eval()
    harpe = tiny_model(config, bases=[10000, 10000]).eval()
    harpe.load_state_dict(standard.state_dict())
    ids = tokens(2, 16)
    with megatron_on_cpu():  # megatron's RotaryEmbedding moves its table to "cuda"
        expected = standard(ids, None, None)
    assert torch.equal(harpe(ids, None, None), expected)
    different = tiny_model(config, bases=[10000, 1e6]).eval()
    different.load_state_dict(standard.state_dict())
    assert not torch.allclose(different(ids, None, None), expected)


def test_plain_gpt_model_with_the_harpe_spec_is_megatrons_standard_rope_model():
    # megatron's RotaryEmbedding hands HarpeSelfAttention one tensor: megatron's own (unfused) RoPE path.
    config = tiny_config()
    ids = tokens(2, 16)
    with megatron_on_cpu():  # megatron's RotaryEmbedding moves its table to "cuda"
        standard = plain_gpt(config, 10000)
        harpe_spec = plain_gpt(config, 10000, harpe_layer_spec("local"))
        assert isinstance(harpe_spec.decoder.layers[0].self_attention, self_attention.HarpeSelfAttention)
        harpe_spec.load_state_dict(standard.state_dict())
        assert torch.equal(harpe_spec.eval()(ids, None, None), standard.eval()(ids, None, None))
        loss, grads = loss_and_grads(standard.train(), ids)
        harpe_loss, harpe_grads = loss_and_grads(harpe_spec.train(), ids)
    assert torch.equal(harpe_loss, loss)
    for name in grads:
        bit_for_bit(harpe_grads[name], grads[name], f"grad of {name}")


def test_fused_rope_request_is_routed_around():
    # Transformer Engine's fused RoPE would read one frequency row for all heads; HARPE attention ignores it.
    ids = tokens(1, 16)
    reference = tiny_model(tiny_config()).eval()(ids, None, None)
    config = tiny_config()
    config.apply_rope_fusion = True  # set after construction: TransformerConfig refuses it without TE
    model = tiny_model(config).eval()
    assert all(not m.config.apply_rope_fusion for m in model.decoder.modules() if hasattr(m, "core_attention"))
    assert torch.equal(model(ids, None, None), reference)


def test_fused_rope_with_a_plain_attention_spec_is_refused():
    config = tiny_config()
    config.apply_rope_fusion = True
    with pytest.raises(ValueError, match="harpe_layer_spec"):
        HarpeGPTModel(config, standard_layer_spec("local"), vocab_size=VOCAB, max_sequence_length=64,
                      harpe_bases=TINY_BASES, harpe_rope_impl="unfused")
    with pytest.raises(ValueError, match="cannot take HARPE's kernel inputs"):
        HarpeGPTModel(tiny_config(), standard_layer_spec("local"), vocab_size=VOCAB, max_sequence_length=64,
                      harpe_bases=TINY_BASES)


def test_fused_rope_switched_on_later_with_a_plain_attention_spec_is_refused(monkeypatch):
    # megatron's plain attention reads apply_rope_fusion at forward time: refused then too (issue 15, item 7).
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", _fused_rope)
    config = tiny_config()
    model = HarpeGPTModel(config, standard_layer_spec("local"), vocab_size=VOCAB, max_sequence_length=64,
                          harpe_bases=TINY_BASES, harpe_rope_impl="unfused").eval()
    model(tokens(1, 8), None, None)  # fusion off: runs
    config.apply_rope_fusion = True
    with pytest.raises(ValueError, match="plain attention.*apply_rope_fusion"):
        model(tokens(1, 8), None, None)


class _FusedRopeCalled(Exception):
    pass


def _fused_rope(*args, **kwargs):
    raise _FusedRopeCalled("Transformer Engine's fused RoPE was called with HARPE's per-head frequencies")


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, None, None, labels=torch.roll(ids, -1, 1)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
])
def test_activation_recompute_changes_nothing(recompute, monkeypatch):
    # The torch kernel's inputs (positions, table) cross megatron's checkpoint as the pair of tensors it saves.
    calls = []
    kernel = self_attention.harpe_rope_qk
    monkeypatch.setattr(self_attention, "harpe_rope_qk", lambda *a, **k: calls.append(k["impl"]) or kernel(*a, **k))
    ids = tokens(2, 16)
    loss, grads = loss_and_grads(tiny_model(tiny_config(), harpe_rope_impl="torch").train(), ids)
    assert calls == ["torch"] * 2  # one per layer
    with megatron_on_cpu():  # megatron's checkpoint saves and restores CUDA RNG state
        loss_rc, grads_rc = loss_and_grads(tiny_model(tiny_config(**recompute), harpe_rope_impl="torch").train(), ids)
    # Full recompute checkpoints both layers here: each rotates again in backward, from the pair the checkpoint kept.
    assert calls == ["torch"] * (2 + 2 + (2 if recompute["recompute_granularity"] == "full" else 0))
    assert torch.equal(loss, loss_rc)
    for name in grads:
        torch.testing.assert_close(grads_rc[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_kernel_path_equals_megatron_unfused_path_bit_for_bit():
    ids = tokens(2, 16)
    kernel = tiny_model(tiny_config(), harpe_rope_impl="torch").train()
    unfused = tiny_model(tiny_config(), harpe_rope_impl="unfused").train()
    # The provider and every attention were built for their path: (positions, table) or megatron's frequencies.
    assert [t.dim() for t in kernel.rotary_pos_emb(16)] == [1, 2]
    assert [t.dim() for t in unfused.rotary_pos_emb(16)] == [4, 4]
    assert {m.rope_impl for m in kernel.modules() if isinstance(m, self_attention.HarpeSelfAttention)} == {"torch"}
    assert {m.rope_impl for m in unfused.modules() if isinstance(m, self_attention.HarpeSelfAttention)} == {"unfused"}
    loss_k, grads_k = loss_and_grads(kernel, ids)
    loss_u, grads_u = loss_and_grads(unfused, ids)
    assert torch.equal(loss_k, loss_u)
    assert all(torch.equal(grads_k[n], grads_u[n]) for n in grads_u)


def model_saved_bytes(model, ids):
    return saved_bytes(model, ids, None, None, labels=ids)


def test_harpe_saves_no_more_for_backward_than_standard_rope():
    ids = tokens(2, 64)
    config = tiny_config(num_attention_heads=8, num_query_groups=8)
    bases = [1e4 * (h + 1) for h in range(8)]
    with megatron_on_cpu():
        standard = model_saved_bytes(plain_gpt(config, 10000), ids)
    harpe = model_saved_bytes(tiny_model(config, bases=bases), ids)
    unfused = model_saved_bytes(tiny_model(config, bases=bases, harpe_rope_impl="unfused"), ids)
    assert harpe <= 1.01 * standard
    assert unfused > harpe  # megatron's unfused path keeps [s, 1, h, d] cos/sin per layer


def packed_params(lengths, padded_lengths=None):
    """THD parameters as megatron-LM builds them: max_seqlen is the longest *unpadded* sequence."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    padded = None if padded_lengths is None else torch.tensor([0, *itertools.accumulate(padded_lengths)],
                                                              dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                           cu_seqlens_kv_padded=padded, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


# Padded: the last sequence (7 tokens, padded to 8) reaches past max_seqlen = 7. Megatron's own THD RoPE
# (the unfused path) sizes its table by max_seqlen and cannot run that batch, so only the kernel path is asked to.
@pytest.mark.parametrize("rope_impl, padded_lengths", [("torch", None), ("unfused", None), ("torch", [8, 4, 8])])
def test_packed_thd_equals_sequences_run_separately(rope_impl, padded_lengths):
    model = tiny_model(tiny_config(), harpe_rope_impl=rope_impl).eval()
    lengths = [6, 3, 7]
    seqs = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    slots = padded_lengths or lengths
    # Each sequence, then its padding (token 0; causal attention keeps real tokens from seeing it).
    ids = torch.cat([torch.cat([s, torch.zeros(1, p - n, dtype=s.dtype)], dim=1)
                     for s, n, p in zip(seqs, lengths, slots)], dim=1)
    packed = model(ids, None, None, packed_seq_params=packed_params(lengths, padded_lengths))
    start = 0
    for seq, n, slot in zip(seqs, lengths, slots):
        torch.testing.assert_close(packed[:, start : start + n], model(seq, None, None), atol=1e-5, rtol=1e-5)
        start += slot


def test_packed_positions_are_computed_once_per_micro_batch(monkeypatch):
    # Every layer, the core attention and the recompute of every layer reuse one computation per cu_seqlens.
    calls = []
    compute = positions_module.packed_local_coordinates
    monkeypatch.setattr(positions_module, "packed_local_coordinates", lambda *a: calls.append(a) or compute(*a))
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = tiny_model(tiny_config(num_layers=3, **recompute)).train()
    for micro_batch in range(2):
        params = packed_params([6, 3, 7], [8, 4, 8])  # new tensors: a new micro-batch
        ids = tokens(1, 20, seed=micro_batch)
        with megatron_on_cpu():
            model(ids, None, None, labels=ids, packed_seq_params=params).sum().backward()
        assert len(calls) == micro_batch + 1


def test_hybrid_model_with_attention_mlp_pattern_gives_the_same_logits():
    config = tiny_config()
    gpt = tiny_model(config).eval()
    hybrid_config = tiny_config(num_layers=2 * config.num_layers)
    hybrid = HarpeHybridModel(hybrid_config, harpe_hybrid_stack_spec("local"), vocab_size=VOCAB,
                              max_sequence_length=4096, hybrid_layer_pattern="*-*-", harpe_bases=TINY_BASES).eval()
    mapped = {}
    for name, tensor in gpt.state_dict().items():
        if name.startswith("decoder.layers."):
            _, _, i, rest = name.split(".", 3)
            mlp_part = rest.startswith(("pre_mlp_layernorm", "mlp."))
            name = f"decoder.layers.{2 * int(i) + int(mlp_part)}.{rest}"
        elif name.startswith("decoder.final_layernorm"):
            name = name.replace("final_layernorm", "final_norm")
        mapped[name] = tensor
    missing, unexpected = hybrid.load_state_dict(mapped, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    ids = tokens(2, 16)
    torch.testing.assert_close(hybrid(ids, None, None), gpt(ids, None, None), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bases, message", [
    ([1e4], "got 1 bases for 2 query groups"),
    ([1e4, 0.0], "query group 1 is 0.0"),
    ([1e4, float("inf")], "positive and finite"),
])
def test_bad_bases_are_refused(bases, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(tiny_config(), bases=bases)


def test_non_rope_and_llama3_scaling_are_refused():
    with pytest.raises(ValueError, match="position_embedding_type must be 'rope'"):
        tiny_model(tiny_config(), position_embedding_type="learned_absolute")
    with pytest.raises(ValueError, match="rope_scaling"):
        tiny_model(tiny_config(), rope_scaling=True)


def decode(model, ids, prompt=8):
    """Logits of a prompt, then of one token at a time against the KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    with torch.no_grad(), megatron_on_cpu():  # the KV cache is allocated on "cuda"
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
        steps = [model(ids[:, :prompt], None, None, inference_context=context)]
        context.sequence_len_offset += prompt
        for i in range(prompt, ids.size(1)):
            steps.append(model(ids[:, i : i + 1], None, None, inference_context=context))
            context.sequence_len_offset += 1
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("rope_impl", ["torch", "unfused"])
def test_kv_cache_decoding_matches_the_full_forward(rope_impl):
    # Inference takes megatron's unfused RoPE, sliced to the cache position, with per-head frequencies.
    model = tiny_model(tiny_config(), harpe_rope_impl=rope_impl).eval()
    ids = tokens(1, 12)
    with torch.no_grad():
        full = model(ids, None, None)
    torch.testing.assert_close(decode(model, ids), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_impl", ["torch", "unfused"])
def test_kv_cache_decoding_ignores_rope_fusion_switched_on_later(monkeypatch, rope_impl):
    # Decoding hands materialized per-head frequencies to megatron's RoPE, which reads apply_rope_fusion then.
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", _fused_rope)
    config = tiny_config()
    model = tiny_model(config, harpe_rope_impl=rope_impl).eval()
    ids = tokens(1, 12)
    expected = decode(model, ids)
    config.apply_rope_fusion = True
    assert torch.equal(decode(model, ids), expected)


# ----------------------------------------------------------------------------------------------------------
# --no-rope-freq: the layers it marks get no RoPE on any path, as in megatron's Attention.

NO_ROPE_LAYERS = [
    dict(num_layers=4, no_rope_freq=2),  # an int N: every Nth layer, [0, 1, 0, 1] after megatron's __post_init__
    dict(num_layers=3, no_rope_freq=[1, 0, 1]),
]


def equal_bases_pair(config, rope_impl):
    """megatron's GPTModel with standard RoPE and a HARPE model with all bases equal to its base, same weights."""
    standard = plain_gpt(config, 10000)
    harpe = tiny_model(config, bases=[10000, 10000], harpe_rope_impl=rope_impl)
    harpe.load_state_dict(standard.state_dict())
    return standard, harpe


def check_no_rope_layers_match_megatron(rope_impl, layers, compare):
    """Logits and every gradient of HARPE (equal bases) against megatron's GPTModel under ``no_rope_freq``."""
    config = tiny_config(**layers)
    assert 0 < sum(config.no_rope_freq) < config.num_layers, config.no_rope_freq
    standard, harpe = equal_bases_pair(config, rope_impl)
    ids = tokens(2, 16)
    with megatron_on_cpu():  # megatron's RotaryEmbedding moves its table to "cuda"
        expected = standard.eval()(ids, None, None)
        loss, grads = loss_and_grads(standard.train(), ids)
        with_rope = plain_gpt(tiny_config(num_layers=config.num_layers), 10000).eval()(ids, None, None)
    assert not torch.allclose(with_rope, expected, atol=1e-4)  # the marked layers matter at this size
    compare(harpe.eval()(ids, None, None), expected, "logits")
    harpe_loss, harpe_grads = loss_and_grads(harpe.train(), ids)
    compare(harpe_loss, loss, "loss")
    for name in grads:
        compare(harpe_grads[name], grads[name], f"grad of {name}")


def bit_for_bit(actual, expected, what):
    assert torch.equal(actual, expected), f"{what}: max |diff| {(actual - expected).abs().max().item()}"


@pytest.mark.parametrize("rope_impl", ["torch", "unfused"])
@pytest.mark.parametrize("layers", NO_ROPE_LAYERS)
def test_no_rope_layers_equal_megatron_bit_for_bit(rope_impl, layers):
    check_no_rope_layers_match_megatron(rope_impl, layers, bit_for_bit)


TRITON_NO_ROPE = """
import sys
sys.path.insert(0, {tests!r})
from megatron_harpe.distributed import free_port, init_model_parallel, init_process_group
import test_model
init_process_group(0, 1, free_port())
init_model_parallel(1, 1, 1)
for layers in test_model.NO_ROPE_LAYERS:
    test_model.check_no_rope_layers_match_megatron("triton", layers, test_model.close_to_float32_rope)
print("ok")
"""


def close_to_float32_rope(actual, expected, what):
    # Triton rounds its float32 rotation once where megatron rounds cos, sin and each product: the
    # tolerance of the multi-rank parity tests (tests/test_model_parallel.py), far below the ~2e-3
    # that rotating a layer megatron leaves alone costs.
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def test_no_rope_layers_equal_megatron_with_the_triton_kernel():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # Triton's interpreter: the kernel itself, on the CPU
    script = TRITON_NO_ROPE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("rope_impl", ["torch", "unfused"])
def test_kv_cache_decoding_skips_no_rope_layers_like_megatron(rope_impl):
    standard, harpe = equal_bases_pair(tiny_config(**NO_ROPE_LAYERS[1]), rope_impl)
    ids = tokens(1, 12)
    with torch.no_grad(), megatron_on_cpu():
        full = standard.eval()(ids, None, None)
    torch.testing.assert_close(decode(harpe.eval(), ids), full, atol=1e-5, rtol=1e-5)


def test_unknown_rope_impl_is_refused():
    with pytest.raises(ValueError, match="unknown HARPE RoPE implementation"):
        tiny_model(tiny_config(), harpe_rope_impl="fused")


def test_spec_impl_choices():
    assert harpe_layer_spec("local").submodules.self_attention.submodules.core_attention is SDPAttention
    assert standard_layer_spec("local").submodules.self_attention.module.__name__ == "SelfAttention"
    with pytest.raises(ValueError, match="unknown layer implementation"):
        harpe_layer_spec("cuda")


def test_the_layer_spec_given_is_left_as_it_was():
    # The RoPE path goes into a new spec's params before megatron builds the layers; the caller's spec is untouched.
    spec = harpe_layer_spec("local")
    params = dict(spec.submodules.self_attention.params)
    model = HarpeGPTModel(tiny_config(), spec, vocab_size=VOCAB, max_sequence_length=64, harpe_bases=TINY_BASES,
                          harpe_rope_impl="torch")
    assert spec.submodules.self_attention.params == params and "rope_impl" not in params
    assert model.decoder.layers[0].self_attention.rope_impl == "torch"
    assert model.rotary_pos_emb.rope_impl == "torch"
