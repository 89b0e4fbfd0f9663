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
        "test": ["pytest"],
        # The exported HARPE model's code uses transformers 5.24's attention API (megatron_harpe/hf/).
        "hf": ["transformers>=5.24,<6"],
        "plots": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "harpe-demo=megatron_harpe.demo:main",
            "harpe-select-bases=megatron_harpe.bases_cli:main",
        ]
    },
)
