"""HARPE Llama configuration: Llama's, plus one RoPE base per key/value head (query group); ``rope_parameters``
may add position interpolation (``linear``)."""

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
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if self.harpe_bases is not None and rope_type not in ("default", "linear"):
            raise ValueError(f"rope_parameters rope_type {rope_type!r}: HARPE runs plain RoPE ('default') or "
                             "position interpolation ('linear') on its per-group bases")
