"""Llama-shaped megatron-core TransformerConfigs (RMSNorm, SwiGLU, no biases, untied embeddings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and megatron load inside llama_config: the shapes below serve --help and the planner
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

# Llama-2 shapes (Touvron et al. 2023); 70B uses GQA with 8 query groups.
LLAMA2_SHAPES = {
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32, ffn_hidden_size=11008),
    "13b": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=40, ffn_hidden_size=13824),
    "70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672),
}
LLAMA2_VOCAB_SIZE = 32000
LLAMA2_NORM_EPS = 1e-5

#: A Llama-shaped model small enough for CPU tests and demos (GQA: 4 heads in 2 groups).
TINY_SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)


def llama_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    num_query_groups: int | None = None,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    params_dtype: "torch.dtype | None" = None,
    cpu: bool | None = None,
    **overrides,
) -> "TransformerConfig":
    """A megatron-core config for a Llama-2-style decoder; ``cpu`` (default: no CUDA) turns off CUDA-only fusions.

    ``params_dtype`` defaults to float32.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or torch.float32
    if cpu is None:
        cpu = not torch.cuda.is_available()
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups or num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        kv_channels=hidden_size // num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=LLAMA2_NORM_EPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu,
    )
    if cpu:
        fields.update(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
        )
    fields.update(overrides)
    return TransformerConfig(**fields)
