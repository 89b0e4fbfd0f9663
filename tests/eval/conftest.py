import os

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a sentencepiece tokenizer, as tools/convert_megatron_to_hf.py writes one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_hf")
    spm = train_sentencepiece([FillerText(s).document(3000) for s in range(3)], str(root / "spm"), vocab_size=500)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(str(root / "model"))
    os.replace(spm, root / "model" / "tokenizer.model")
    return str(root / "model")


@pytest.fixture(scope="session")
def tiny_harpe_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model as a HARPE export: tools/convert_megatron_to_hf.py's config.json (auto_map) and code files."""
    import json
    import shutil

    from megatron_harpe.convert.hf_checkpoint import write_hf_config
    from megatron_harpe.shape import LlamaShape

    root = tmp_path_factory.mktemp("tiny_harpe") / "model"
    shutil.copytree(tiny_model_dir, root)
    config = json.loads((root / "config.json").read_text())
    os.remove(root / "config.json")
    write_hf_config(str(root), LlamaShape.from_hf_config(config), "fp32", harpe_bases=[1e4, 5e5])
    return str(root)
