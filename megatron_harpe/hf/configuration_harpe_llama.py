"""HARPE Llama configuration: Llama's, plus one RoPE base per key/value head (query group)."""

from transformers import LlamaConfig


class HarpeLlamaConfig(LlamaConfig):
    model_type = "harpe_llama"

    def __init__(self, harpe_bases=None, **kwargs):
        super().__init__(**kwargs)
        self.harpe_bases = [float(b) for b in harpe_bases] if harpe_bases is not None else None
        groups = self.num_key_value_heads or self.num_attention_heads
        if self.harpe_bases is not None and len(self.harpe_bases) != groups:
            raise ValueError(f"harpe_bases has {len(self.harpe_bases)} bases for {groups} key/value heads: "
                             "HARPE needs one base per query group")
