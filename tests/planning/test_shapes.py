"""Model shapes: the Llama-2 parameter counts Meta published, config.json parsing, Megatron's vocabulary padding."""

import argparse
import json

import pytest

from megatron_harpe.planning.shapes import PRESETS, ModelShape, resolve_model, shape_from_config

# Exact parameter counts of the Hugging Face checkpoints meta-llama/Llama-2-{7b,13b,70b}-hf (vocabulary 32000).
PUBLISHED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_llama2_parameter_counts(name):
    assert PRESETS[name].total_parameters(tp=1) == PUBLISHED[name]


@pytest.mark.parametrize("vocab", [32000, 32001, 50257, 128256])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vocabulary_padding_is_megatrons(vocab, tp):
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    shape = ModelShape(name="x", num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                       ffn_hidden_size=128, vocab_size=vocab)
    args = argparse.Namespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, rank=0)
    assert shape.padded_vocab_size(tp) == vocab_size_with_padding(vocab, args, logging_enabled=False)


def test_hugging_face_config_json_gives_the_preset(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000)
    path = tmp_path / "config.json"
    config.to_json_file(str(path))
    shape = resolve_model(str(path))
    assert shape.total_parameters() == PUBLISHED["70b"]
    assert (shape.num_query_groups, shape.kv_channels, shape.gated, shape.tied_embeddings) == (8, 128, True, False)


def test_megatron_names_and_errors(tmp_path):
    shape = shape_from_config({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                               "ffn_hidden_size": 128, "vocab_size": 1000}, "tiny")
    assert (shape.num_query_groups, shape.kv_channels, shape.key_value_width) == (2, 16, 64)
    with pytest.raises(ValueError, match="missing intermediate_size"):
        shape_from_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}, "x")
    with pytest.raises(ValueError, match="do not split into 3 query groups"):
        shape_from_config({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 3,
                           "ffn_hidden_size": 128}, "x")
    with pytest.raises(ValueError, match="choose 7b, 13b, 70b or the path"):
        resolve_model("7B-chat")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        resolve_model(str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        resolve_model(str(bad))
