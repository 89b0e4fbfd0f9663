import numpy as np
import pytest

from megatron_harpe.data.synthetic import FillerText
from megatron_harpe.data.tokenizer import train_sentencepiece


@pytest.fixture(scope="session")
def two_indexed_datasets(tmp_path_factory):
    """Two Megatron indexed datasets of random-length documents and a sentencepiece model their ids fit.

    ``(prefix_a, prefix_b, tokenizer_model)``: what a weighted ``--data-path 0.6 A 0.4 B`` blend reads, the shape
    ``tools/build_long_context_mix.py --format blend`` writes.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("blend")
    texts = [FillerText(seed=s).document(2000) for s in range(3)]
    model = train_sentencepiece(texts, str(root / "tok"), vocab_size=500)
    prefixes = []
    for name, seed in (("a", 1), ("b", 2)):
        rng = np.random.default_rng(seed)
        builder = IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=np.int32)
        for _ in range(60):
            doc = rng.integers(3, 500, size=int(rng.integers(20, 400))).astype(np.int32)
            builder.add_document(doc, [doc.size])
        builder.finalize(str(root / f"{name}.idx"))
        prefixes.append(str(root / name))
    return prefixes[0], prefixes[1], model
