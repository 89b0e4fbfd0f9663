from setuptools import find_packages, setup

setup(
    name="megatron-harpe",
    version="0.1.0",
    description="HARPE (Head-Adaptive Rotary Position Encoding) long-context training for megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_harpe", "megatron_harpe.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        # Tested minor version; megatron.training ships inside the wheel from 0.17 on.
        "megatron-core>=0.19.2,<0.20",
        "numpy",
        "sentencepiece",
        "nltk",
        "safetensors",
        "tqdm",
        # megatron.core.dist_checkpointing's file writer needs it (torch_dist checkpoints).
        "psutil",
        # sentencepiece's model proto (the tokenizer checks a model before word-cached encoding).
        "protobuf",
    ],
    # Never apex or transformer-engine: both come from NVIDIA's PyTorch container (see docker/).
    extras_require={
        # gguf, protobuf: the real Llama-2 tokenizer rebuilt from llama.cpp's vocabulary (tests/llama2_spm.py).
        "test": ["pytest", "gguf", "protobuf"],
        # The exported HARPE model's code uses transformers 5.24's attention API (megatron_harpe/hf/).
        "hf": ["transformers>=5.24,<6"],
        "plots": ["matplotlib"],
    },
    # Every command; tools/*.py are the same functions as scripts (tests/integration/test_tools_help.py checks the pairs).
    entry_points={
        "console_scripts": [
            "harpe-select-bases=megatron_harpe.cli:select_bases",
            "harpe-demo=megatron_harpe.cli:demo",
            "harpe-convert-hf-to-megatron=megatron_harpe.convert.cli:hf_to_megatron",
            "harpe-convert-megatron-to-hf=megatron_harpe.convert.cli:megatron_to_hf",
            "harpe-reshard-megatron=megatron_harpe.convert.cli:reshard",
            "harpe-plan-parallelism=megatron_harpe.planning.cli:main",
            "harpe-eval-niah=megatron_harpe.eval.cli:eval_niah",
            "harpe-eval-passkey=megatron_harpe.eval.cli:eval_passkey",
            "harpe-eval-perplexity=megatron_harpe.eval.cli:eval_perplexity",
            "harpe-compare-niah=megatron_harpe.eval.cli:compare_niah",
            "harpe-make-synthetic-corpus=megatron_harpe.data.cli:make_synthetic_corpus",
            "harpe-preprocess-data=megatron_harpe.data.cli:preprocess_data",
            "harpe-build-long-context-mix=megatron_harpe.data.cli:build_long_context_mix",
            "harpe-compare-methods=megatron_harpe.compare.cli:compare_methods",
        ]
    },
)
