"""LlamaShape: the Llama-2 parameter counts Meta published, config.json and Megatron args in and out (round trips
through megatron's own parser), Megatron's vocabulary padding, query-group normalisation, refusals."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from megatron_harpe.command import UsageError
from megatron_harpe.shape import SHAPES, LlamaShape, ShapeError, resolve_model

# Exact parameter counts of the Hugging Face checkpoints meta-llama/Llama-2-{7b,13b,70b}-hf (vocabulary 32000).
PUBLISHED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
# What the launch scripts passed for each model before the shapes came from here (examples/llama2_common.sh).
SCRIPT_FLAGS = {
    "7b": "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32",
    "13b": "--num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824 --num-attention-heads 40",
    "70b": "--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64 "
           "--group-query-attention --num-query-groups 8",
    "tiny": "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --group-query-attention "
            "--num-query-groups 2",
}
# The rest of a Llama-2 run's model flags (the recipe's, not the shape's).
LLAMA_FLAGS = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear"]


def megatron_parse(flags: list[str]) -> argparse.Namespace:
    """megatron.training's own parser on ``flags`` (no validate_args: the normalisation is ours to do)."""
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["pretrain_harpe.py", *flags]
    try:
        return parse_args()
    finally:
        sys.argv = saved


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_llama2_parameter_counts(name):
    assert SHAPES[name].total_parameters(tp=1) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(SCRIPT_FLAGS))
def test_preset_flags_are_the_launch_scripts(name):
    assert " ".join(SHAPES[name].to_megatron_flags()) == SCRIPT_FLAGS[name]


@pytest.mark.parametrize("vocab", [32000, 32001, 50257, 128256])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vocabulary_padding_is_megatrons(vocab, tp):
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    shape = LlamaShape(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=vocab)
    for divisor in (128, 64):
        args = argparse.Namespace(make_vocab_size_divisible_by=divisor, tensor_model_parallel_size=tp, rank=0)
        assert shape.padded_vocab_size(tp, divisor) == vocab_size_with_padding(vocab, args, logging_enabled=False)
    assert shape.padded_vocab_size(tp) % (128 * tp) == 0 and 0 <= shape.padded_vocab_size(tp) - vocab < 128 * tp


@pytest.mark.parametrize("groups", [None, 0, 4])
def test_no_query_groups_means_one_per_head(groups):
    shape = LlamaShape(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                       num_query_groups=groups)
    assert (shape.num_query_groups, shape.kv_channels, shape.head_dim) == (4, 16, 16)
    assert shape == LlamaShape(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                               num_query_groups=4, kv_channels=16, name="other")  # the name is not the shape
    assert "--group-query-attention" not in shape.to_megatron_flags()


def test_with_sizes_rederives_what_was_derived():
    tiny = SHAPES["tiny"]
    wider = tiny.with_sizes(num_attention_heads=8, num_query_groups=8)
    assert (wider.kv_channels, wider.num_query_groups, wider.num_layers) == (8, 8, 2)
    assert tiny.with_sizes(num_attention_heads=8).num_query_groups == 2  # GQA's groups were given: kept
    assert SHAPES["7b"].with_sizes(num_attention_heads=16).num_query_groups == 16  # MHA stays MHA
    custom = LlamaShape(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=32)
    assert custom.with_sizes(num_layers=3).kv_channels == 32


@pytest.mark.parametrize("name", sorted(SCRIPT_FLAGS))
def test_megatron_args_round_trip(name):
    shape = SHAPES[name]
    args = megatron_parse(shape.to_megatron_flags() + LLAMA_FLAGS + ["--max-position-embeddings", "4096"])
    assert LlamaShape.from_megatron_args(args, vocab_size=32000) == shape
    assert (args.num_query_groups if args.group_query_attention else None) == (
        shape.num_query_groups if shape.num_query_groups != shape.num_attention_heads else None)


def test_megatron_args_keep_what_the_planner_reads():
    custom = LlamaShape(num_layers=3, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6, num_query_groups=3,
                        kv_channels=32, vocab_size=1000, max_position_embeddings=8192, rope_theta=5e5, norm_eps=1e-6)
    flags = custom.to_megatron_flags()
    assert flags[8:10] == ["--kv-channels", "32"]  # only where it is not hidden / heads
    args = megatron_parse(flags + LLAMA_FLAGS + ["--max-position-embeddings", "8192", "--rotary-base", "500000",
                                                 "--norm-epsilon", "1e-6", "--vocab-size", "1000"])
    assert LlamaShape.from_megatron_args(args) == custom
    # The planner's variants: no SwiGLU, tied embeddings (strict=False reads them; strict refuses)
    variant = megatron_parse(flags + ["--vocab-size", "1000"])
    with pytest.raises(ShapeError, match="not a Llama"):
        LlamaShape.from_megatron_args(variant)
    loose = LlamaShape.from_megatron_args(variant, strict=False)
    assert (loose.gated, loose.tied_embeddings, loose.num_query_groups, loose.kv_channels) == (False, True, 3, 32)


def test_megatron_args_refusals():
    args = megatron_parse(SHAPES["tiny"].to_megatron_flags() + LLAMA_FLAGS)
    args.padded_vocab_size = 128
    with pytest.raises(ShapeError, match=r"do not record the true vocabulary size \(only the padded 128\)$"):
        LlamaShape.from_megatron_args(args)
    with pytest.raises(ShapeError, match=r"^vocabulary 129 is larger than the checkpoint's 128 embedding rows$"):
        LlamaShape.from_megatron_args(args, vocab_size=129)
    assert LlamaShape.from_megatron_args(args, vocab_size=100).vocab_size == 100


def _hf_config(**changes) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5}).to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize("rope, scaling", [
    ({"rope_type": "default", "rope_theta": 5e5}, None),
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}, ("linear", (("factor", 4),))),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 5e5},
     ("yarn", (("factor", 4.0), ("original_max_position_embeddings", 512), ("beta_fast", 32.0), ("beta_slow", 1.0),
               ("truncate", True), ("mscale", 1.0), ("mscale_all_dim", 0.0)))),
])
def test_hugging_face_config_round_trip(tmp_path, rope, scaling):
    from megatron_harpe.convert.hf_checkpoint import write_hf_config
    from megatron_harpe.convert.rope_scaling import RopeScaling

    shape = LlamaShape.from_hf_config(_hf_config(rope_parameters=rope))
    assert shape == LlamaShape(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, vocab_size=1000, max_position_embeddings=2048, rope_theta=5e5,
                               norm_eps=1e-6, rope_scaling=scaling and RopeScaling(*scaling))
    write_hf_config(str(tmp_path), shape, "fp32", harpe_bases=None)
    assert LlamaShape.from_hf_config(json.loads((tmp_path / "config.json").read_text())) == shape


@pytest.mark.parametrize("legacy", [{"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
                                    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e5}])
def test_hugging_face_legacy_rope_scaling_is_read_as_transformers_reads_it(legacy):
    config = {k: v for k, v in _hf_config().items() if k != "rope_parameters"}
    shape = LlamaShape.from_hf_config({**config, **legacy})
    assert (shape.rope_theta, shape.rope_scaling.rope_type, shape.rope_scaling["factor"]) == (5e5, "linear", 2)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="bert"), "model_type 'bert' is not a Llama"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(attention_bias=True), "unsupported biases"),
    (dict(tie_word_embeddings=True), "unsupported tied input and output embeddings"),
    (dict(head_dim=32), "unsupported head_dim 32 != hidden_size / heads"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0}), "RoPE scaling 'dynamic' has no megatron "),
    (dict(num_key_value_heads=3), "4 attention heads do not split into 3 query groups"),
    (dict(intermediate_size=None), "missing intermediate_size"),
])
def test_hugging_face_refusals(changes, message):
    with pytest.raises(ShapeError, match=message) as refused:
        LlamaShape.from_hf_config(_hf_config(**changes), "m/config.json")
    assert isinstance(refused.value, UsageError) and isinstance(refused.value, ValueError)


def test_hugging_face_config_json_gives_the_preset(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000)
    path = tmp_path / "config.json"
    config.to_json_file(str(path))
    shape = resolve_model(str(path))
    assert shape.total_parameters() == PUBLISHED["70b"]
    assert (shape.num_query_groups, shape.kv_channels, shape.gated, shape.tied_embeddings) == (8, 128, True, False)


def test_the_planner_reads_variants_leniently():
    shape = LlamaShape.from_config(_hf_config(model_type="mistral", tie_word_embeddings=True, head_dim=32,
                                              hidden_act="gelu"), "x")
    assert (shape.tied_embeddings, shape.kv_channels, shape.gated) == (True, 32, False)


def test_megatron_names_and_errors(tmp_path):
    shape = LlamaShape.from_config({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                    "num_query_groups": 2, "ffn_hidden_size": 128, "vocab_size": 1000}, "tiny")
    assert (shape.num_query_groups, shape.kv_channels, shape.key_value_width) == (2, 16, 64)
    with pytest.raises(ValueError, match="missing intermediate_size"):
        LlamaShape.from_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}, "x")
    with pytest.raises(ValueError, match="do not split into 3 query groups"):
        LlamaShape.from_config({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 3,
                                "ffn_hidden_size": 128}, "x")
    with pytest.raises(ValueError, match=r"choose 7b, 13b, 70b or the path of a config.json \(or tiny"):
        resolve_model("7B-chat")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        resolve_model(str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        resolve_model(str(bad))


@pytest.mark.parametrize("tp, pp, message", [
    (3, 1, "TP=3 must divide the 4 heads and the 2 query groups"),
    (4, 1, "TP=4 must divide the 4 heads and the 2 query groups"),
    (1, 3, "PP=3 must divide the 2 layers"),
])
def test_check_layout_refuses(tp, pp, message):
    with pytest.raises(ShapeError, match=message):
        SHAPES["tiny"].check_layout(tp, pp)


def test_check_layout_accepts_and_names_the_mlp():
    SHAPES["70b"].check_layout(8, 4)
    with pytest.raises(ShapeError, match="TP=8 must divide the MLP width 100"):
        LlamaShape(num_layers=1, hidden_size=64, ffn_hidden_size=100, num_attention_heads=8).check_layout(8, 1)


def test_transformer_config_is_megatrons_llama():
    import torch

    config = SHAPES["70b"].transformer_config(tp=8, pp=4, params_dtype=torch.bfloat16, cpu=True,
                                              perform_initialization=False)
    assert (config.num_layers, config.hidden_size, config.num_query_groups, config.kv_channels) == (80, 8192, 8, 128)
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (8, 4)
    assert config.gated_linear_unit and config.normalization == "RMSNorm" and not config.add_bias_linear
    assert config.bf16 and not config.apply_rope_fusion and config.layernorm_epsilon == 1e-5
    custom = LlamaShape(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=32,
                        norm_eps=1e-6).transformer_config(cpu=True)
    assert (custom.kv_channels, custom.layernorm_epsilon, custom.params_dtype) == (32, 1e-6, torch.float32)


def test_importing_the_shapes_loads_neither_torch_nor_megatron():
    import subprocess

    code = ("import sys; import megatron_harpe.shape; "
            "assert not {'torch', 'megatron'} & {m.split('.')[0] for m in sys.modules}, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
