import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_harpe.data import mixture
from megatron_harpe.data.cli import build_long_context_mix, build_long_context_mix_parser, mixture_spec
from megatron_harpe.data.cli import preprocess_data as preprocess_main
from megatron_harpe.data.mixture import FU_ET_AL_WEIGHTS, MixtureSpec, canonical_source, document_lengths, plan_mixture
from megatron_harpe.data.synthetic import source_documents, write_jsonl

SOURCES = ("commoncrawl", "c4", "book", "arxiv")


@pytest.fixture(scope="module")
def source_prefixes(tmp_path_factory, spm_model):
    """Four synthetic sources with different document-length distributions, preprocessed."""
    root = tmp_path_factory.mktemp("sources")
    prefixes = {}
    for index, source in enumerate(SOURCES):
        corpus = write_jsonl(source_documents(source, 80, seed=index, length_scale=0.05), str(root / f"{source}.jsonl"))
        assert preprocess_main(["--input", corpus, "--output-prefix", str(root / source), "--append-eod",
                                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model]) == 0
        prefixes[source] = str(root / f"{source}_text_document")
    return prefixes


def build(prefixes, out, *extra):
    argv = [f"--source={name}={prefix}" for name, prefix in prefixes.items()]
    return build_long_context_mix(argv + ["--output-prefix", str(out), *map(str, extra)])


def source_of_documents(prefixes, output_prefix):
    """Which source each output document came from, found by content (a document, or the prefix of one)."""
    sources = {name: IndexedDataset(prefix) for name, prefix in prefixes.items()}
    index = {}
    for name, dataset in sources.items():
        for d in range(len(dataset.document_indices) - 1):
            a, b = dataset.document_indices[d], dataset.document_indices[d + 1]
            tokens = np.concatenate(dataset[int(a):int(b)])
            index.setdefault(tuple(tokens[:24].tolist()), []).append((name, tokens))
    out = IndexedDataset(output_prefix)
    found = []
    for d in range(len(out.document_indices) - 1):
        a, b = out.document_indices[d], out.document_indices[d + 1]
        tokens = np.concatenate(out[int(a):int(b)])
        candidates = index.get(tuple(tokens[:24].tolist())) or [c for cs in index.values() for c in cs]
        names = {n for n, full in candidates if len(full) >= len(tokens) and np.array_equal(full[:len(tokens)], tokens)}
        assert len(names) == 1, f"output document {d} matches {names}"
        found.append((names.pop(), len(tokens)))
    return found


def test_fu_et_al_defaults():
    spec = MixtureSpec()
    assert spec.weights == FU_ET_AL_WEIGHTS and abs(sum(spec.weights.values()) - 1) < 1e-12
    assert (spec.long_threshold, spec.short_keep_probability, spec.sequence_length) == (4096, 0.1, 131072)
    assert canonical_source("RedPajamaCommonCrawl") == "commoncrawl" and canonical_source("Books") == "book"


def test_mixture_matches_the_spec_proportions(tmp_path, source_prefixes):
    weights = {"commoncrawl": 0.5, "c4": 0.3, "book": 0.15, "arxiv": 0.05}
    target = 40 * 256
    assert build(source_prefixes, tmp_path / "mix", "--long-threshold", 400, "--seq-length", 256,
                 "--target-tokens", target, *[f"--weight={k}={v}" for k, v in weights.items()]) == 0
    found = source_of_documents(source_prefixes, str(tmp_path / "mix"))
    tokens = {name: sum(n for s, n in found if s == name) for name in SOURCES}
    assert sum(tokens.values()) == target
    for name, weight in weights.items():
        assert abs(tokens[name] / target - weight) <= 0.01 * weight, (name, tokens[name] / target, weight)
    report = json.loads((tmp_path / "mix.mixture.json").read_text())
    assert report["sequences"] == 40 and {s["name"]: s["budget"] for s in report["sources"]} == tokens
    assert (tmp_path / "mix.length_histogram.png").stat().st_size > 10_000


def test_short_documents_kept_with_the_spec_probability():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 9000, size=100_000)
    fake = SimpleNamespace(sequence_lengths=lengths.astype(np.int32), document_indices=np.arange(len(lengths) + 1))
    spec = MixtureSpec(weights={"book": 1.0}, sequence_length=1024)
    (plan,) = plan_mixture({"book": "unused"}, spec, {"book": fake})
    short = lengths < 4096
    chosen = np.zeros(len(lengths), bool)
    chosen[[doc for doc, _ in plan.selection]] = True
    assert chosen[~short].all()  # every long document
    rate = chosen[short].mean()
    assert abs(rate - 0.1) < 0.005, rate  # binomial std here is 0.0014
    # Default size: no kept document repeated, all but the last cut one used whole.
    docs = [doc for doc, _ in plan.selection]
    assert len(docs) == len(set(docs)) and plan.epochs <= 1.0
    assert plan.budget == sum(n for _, n in plan.selection) and plan.budget % 1024 == 0


def test_upsampling_raises_the_share_of_long_documents(tmp_path, source_prefixes):
    assert build(source_prefixes, tmp_path / "mix", "--long-threshold", 400, "--seq-length", 256) == 0
    report = json.loads((tmp_path / "mix.mixture.json").read_text())
    share = report["long_document_token_share"]
    assert share["mixture"] > 2 * share["source_mix"] > 0
    limiting = min(report["sources"], key=lambda s: s["kept_tokens"] / s["weight"])
    assert limiting["epochs"] == pytest.approx(1.0, abs=256 / limiting["kept_tokens"] + 1e-9)


def test_blend_output(tmp_path, source_prefixes):
    assert build(source_prefixes, tmp_path / "b", "--long-threshold", 400, "--seq-length", 256, "--format", "blend",
                 "--target-tokens", 20 * 256) == 0
    data_path = (tmp_path / "b.data_path.txt").read_text().split()
    weights, prefixes = list(map(int, data_path[::2])), data_path[1::2]
    assert sum(weights) == 20 * 256 and len(prefixes) == len(SOURCES)
    for weight, prefix in zip(weights, prefixes):
        dataset = IndexedDataset(prefix)
        assert int(document_lengths(dataset).sum()) == weight


def test_errors(tmp_path, source_prefixes, capsys):
    unknown = {"mystery": source_prefixes["c4"]}
    assert build(unknown, tmp_path / "m") == 2  # a flag to add (--weight mystery=W): exit 2, bad usage
    assert "no weight for source(s) ['mystery']" in capsys.readouterr().err
    assert build(source_prefixes, tmp_path / "m") == 1  # default 131072-token sequences: far too little data
    assert "fewer kept tokens than one 131072-token sequence" in capsys.readouterr().err
    assert build({"c4": str(tmp_path / "nothing")}, tmp_path / "m") == 1
    assert "no " in capsys.readouterr().err
    assert build(source_prefixes, tmp_path / "m", "--seq-length", 256) == 0
    assert build(source_prefixes, tmp_path / "m", "--seq-length", 256) == 1
    assert "pass --force" in capsys.readouterr().err
    assert build(source_prefixes, tmp_path / "m", "--seq-length", 256, "--force") == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging left behind


def test_one_weight_replaces_only_its_sources_default(tmp_path, source_prefixes):
    """--weight book=0.3 changes book's share; the other sources keep Fu et al.'s (renormalized over those given)."""
    args = build_long_context_mix_parser().parse_args(["--source", "book=x", "--weight", "books=0.3",
                                                       "--output-prefix", "o"])
    assert mixture_spec(args).weights == {**FU_ET_AL_WEIGHTS, "book": 0.3}
    assert build(source_prefixes, tmp_path / "w", "--long-threshold", 400, "--seq-length", 256,
                 "--target-tokens", 20 * 256, "--weight", "book=0.3") == 0
    report = json.loads((tmp_path / "w.mixture.json").read_text())
    given = {name: FU_ET_AL_WEIGHTS[name] for name in SOURCES} | {"book": 0.3}
    assert {s["name"]: s["weight"] for s in report["sources"]} == pytest.approx(
        {name: w / sum(given.values()) for name, w in given.items()})


def test_spec_file_weights_replace_only_theirs(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"weights": {"RedPajamaBook": 0.2, "mine": 1.0},
                                                    "long_threshold": 2048}))
    spec = MixtureSpec.from_json(str(tmp_path / "spec.json"))
    assert spec.weights == {**FU_ET_AL_WEIGHTS, "book": 0.2, "mine": 1.0} and spec.long_threshold == 2048
    (tmp_path / "bad.json").write_text("weights: book=0.2\n")
    with pytest.raises(mixture.MixtureError, match=r"bad\.json: not a JSON mixture spec"):
        MixtureSpec.from_json(str(tmp_path / "bad.json"))
