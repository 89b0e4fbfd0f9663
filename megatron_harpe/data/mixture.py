"""Per-source length upsampling (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context").

Fu et al. keep SlimPajama's source mix and, within each source, keep every long document but only a fraction of the
short ones, so long documents gain weight without one domain (books) taking over. From per-source indexed datasets
(``tools/preprocess_data.py`` output) this writes the mixture as one indexed dataset (``--data-path PREFIX``) or as
per-source datasets with a Megatron blend (``--data-path w1 p1 w2 p2 ...``), with its document-length histogram as
a table, a JSON report and a PNG. Sentence structure inside documents is kept.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_harpe.command import FAILED, USAGE, CommandError
from megatron_harpe.outputs import atomic_output_files

log = logging.getLogger(__name__)

# SlimPajama's source proportions, which Fu et al. keep (their Table/Section 3).
FU_ET_AL_WEIGHTS = {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045,
                    "arxiv": 0.025, "stackexchange": 0.02}
_ALIASES = {"cc": "commoncrawl", "common_crawl": "commoncrawl", "books": "book", "wiki": "wikipedia",
            "stack_exchange": "stackexchange", "se": "stackexchange", "code": "github"}
HISTOGRAM_EDGES = [0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


class MixtureError(CommandError, ValueError):
    """A spec or a source that cannot make the requested mixture; the message says what to change.

    Exit 2 (the flags or the spec ask for what cannot be), or 1 where the sources' data fall short
    (``exit_code=FAILED``).
    """

    exit_code = USAGE


def canonical_source(name: str) -> str:
    """SlimPajama source names as Fu et al. and RedPajama spell them (``RedPajamaBook`` -> ``book``)."""
    key = re.sub(r"^redpajama", "", name.lower().replace("-", "_"))
    return _ALIASES.get(key, key)


@dataclass
class MixtureSpec:
    """What to build. Defaults reproduce Fu et al.: source weights, 4096-token threshold, 0.1, 128k packing."""

    weights: dict[str, float] = field(default_factory=lambda: dict(FU_ET_AL_WEIGHTS))
    long_threshold: int = 4096
    short_keep_probability: float = 0.1
    target_tokens: int | None = None    # default: the most tokens with no kept document repeated
    sequence_length: int = 131072
    seed: int = 1234

    @classmethod
    def from_json(cls, path: str) -> MixtureSpec:
        """A spec file; its ``weights`` override the defaults source by source, like ``--weight``."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MixtureError(f"{path}: not a JSON mixture spec ({e})", exit_code=FAILED) from None
        if not isinstance(raw, dict):
            raise MixtureError(f"{path}: not a JSON mixture spec (a JSON {type(raw).__name__}, not an object)",
                               exit_code=FAILED)
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise MixtureError(f"{path}: unknown spec field(s) {sorted(unknown)}; known: "
                               f"{sorted(cls.__dataclass_fields__)}")
        if "weights" in raw:
            if not isinstance(raw["weights"], dict):
                raise MixtureError(f"{path}: weights must be an object {{source: weight}}")
            raw["weights"] = with_weights(FU_ET_AL_WEIGHTS, raw["weights"].items(), f"{path} weights")
        return cls(**raw)

    def validate(self) -> None:
        if self.long_threshold < 1 or not 0.0 <= self.short_keep_probability <= 1.0:
            raise MixtureError("long_threshold must be >= 1 and short_keep_probability in [0, 1]")
        if self.sequence_length < 1 or (self.target_tokens is not None and self.target_tokens < self.sequence_length):
            raise MixtureError(f"target_tokens ({self.target_tokens}) must hold at least one sequence of "
                               f"{self.sequence_length} tokens")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise MixtureError(f"source weights must be non-negative with a positive sum, got {self.weights}")


def with_weights(defaults: dict[str, float], given, where: str) -> dict[str, float]:
    """``defaults`` with each given ``(name, weight)`` replacing only its own source's weight (names canonical)."""
    weights = {canonical_source(n): w for n, w in defaults.items()}
    seen: dict[str, str] = {}
    for name, value in given:
        source = canonical_source(name)
        if source in seen:
            raise MixtureError(f"{where}: {seen[source]} and {name} both name source {source}: give it once")
        try:
            weights[source] = float(value)
        except (TypeError, ValueError):
            raise MixtureError(f"{where}: {name}={value!r} is not a number") from None
        seen[source] = name
    return weights


def check_weighted_sources(weighted: list[str], sources: list[str]) -> None:
    """Every ``--weight`` names a ``--source``: a weight for an absent one would be silently unused."""
    given = {canonical_source(n) for n in sources}
    absent = [n for n in weighted if canonical_source(n) not in given]
    if absent:
        raise MixtureError(f"--weight {absent[0]}=...: no --source {absent[0]}; the sources given are "
                           f"{', '.join(sources)} (RedPajama names and aliases such as books, wiki, cc match too)")


@dataclass
class SourcePlan:
    name: str
    prefix: str
    weight: float                 # normalized over the sources given
    documents: int
    tokens: int
    kept_documents: int
    kept_tokens: int
    budget: int                   # tokens this source contributes
    selection: list[tuple[int, int]] = field(repr=False)  # (document index, tokens taken), in mixture order
    epochs: float = 0.0


def document_lengths(dataset) -> np.ndarray:
    """Tokens per document of a megatron-core ``IndexedDataset`` (documents may span several sequences)."""
    cumulative = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    bounds = dataset.document_indices
    return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


def _budgets(weights: dict[str, float], total: int) -> dict[str, int]:
    names = list(weights)
    budgets = {n: int(round(weights[n] * total)) for n in names}
    budgets[names[int(np.argmax([weights[n] for n in names]))]] += total - sum(budgets.values())
    return budgets


def plan_mixture(sources: dict[str, str], spec: MixtureSpec, datasets: dict[str, object]) -> list[SourcePlan]:
    """Choose, per source, which documents (how many tokens of each) go into the mixture."""
    spec.validate()
    names = {canonical_source(n): n for n in sources}
    if len(names) < len(sources):
        raise MixtureError(f"two sources name the same corpus: {sorted(sources)}")
    weights = {canonical_source(n): w for n, w in spec.weights.items()}
    missing = [names[n] for n in names if n not in weights]
    if missing:
        raise MixtureError(f"no weight for source(s) {missing}: give --weight NAME=W (Fu et al. know "
                           f"{', '.join(FU_ET_AL_WEIGHTS)})")
    total_weight = sum(weights[n] for n in names)
    if total_weight <= 0:
        raise MixtureError("the sources given all have weight 0")
    if set(names) != set(weights):
        log.info("weights renormalized over the %d sources given: %s", len(names),
                 {n: round(weights[n] / total_weight, 4) for n in names})

    plans, kept_lengths = [], {}
    for index, name in enumerate(names):
        lengths = document_lengths(datasets[name])
        rng = np.random.default_rng([spec.seed, index])
        keep = (lengths >= spec.long_threshold) | (rng.random(len(lengths)) < spec.short_keep_probability)
        keep &= lengths > 0
        kept = np.flatnonzero(keep)
        kept_lengths[name] = (kept, lengths[kept])
        plans.append(SourcePlan(name=name, prefix=sources[names[name]], weight=weights[name] / total_weight,
                                documents=len(lengths), tokens=int(lengths.sum()), kept_documents=len(kept),
                                kept_tokens=int(lengths[kept].sum()), budget=0, selection=[]))
    empty = [p.name for p in plans if p.weight > 0 and p.kept_tokens == 0]
    if empty:
        raise MixtureError(f"source(s) {empty} keep no tokens: check the datasets or lower --long-threshold",
                           exit_code=FAILED)

    target = spec.target_tokens
    if target is None:  # the largest mixture in which no kept document has to be repeated
        target = int(min(p.kept_tokens / p.weight for p in plans if p.weight > 0))
    target -= target % spec.sequence_length
    if target < spec.sequence_length:
        raise MixtureError(f"the sources hold fewer kept tokens than one {spec.sequence_length}-token sequence "
                           "at these weights: give more data, a smaller --seq-length or --target-tokens",
                           exit_code=FAILED)
    budgets = _budgets({p.name: p.weight for p in plans}, target)
    for index, plan in enumerate(plans):
        plan.budget = budgets[plan.name]
        kept, lengths = kept_lengths[plan.name]
        rng = np.random.default_rng([spec.seed, index, 1])
        remaining = plan.budget
        while remaining > 0:  # whole epochs over the kept documents, reshuffled each time; the last one cut
            order = rng.permutation(len(kept))
            take = np.cumsum(lengths[order])
            stop = int(np.searchsorted(take, remaining))
            chosen = order[: stop + 1]
            tokens = lengths[chosen].astype(np.int64)
            if take[min(stop, len(take) - 1)] > remaining:
                tokens[-1] -= take[stop] - remaining
            plan.selection.extend(zip(kept[chosen].tolist(), tokens.tolist()))
            remaining -= int(tokens.sum())
        plan.epochs = plan.budget / plan.kept_tokens if plan.kept_tokens else 0.0
    return plans


def length_histogram(lengths: np.ndarray, edges=HISTOGRAM_EDGES) -> dict[str, list[float]]:
    """Share of documents and of tokens per document-length bin (the last bin is open-ended)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = np.searchsorted(np.asarray(edges[1:]), lengths, side="right")
    documents = np.bincount(bins, minlength=len(edges)).astype(np.float64)
    tokens = np.bincount(bins, weights=lengths, minlength=len(edges)).astype(np.float64)
    return {"documents": (documents / max(documents.sum(), 1)).tolist(),
            "tokens": (tokens / max(tokens.sum(), 1)).tolist()}


def bin_labels(edges=HISTOGRAM_EDGES) -> list[str]:
    def k(n):
        return f"{n // 1024}k" if n >= 1024 else str(n)
    return [f"{k(a)}-{k(b)}" for a, b in zip(edges[:-1], edges[1:])] + [f">={k(edges[-1])}"]


def histogram_table(before: dict, after: dict) -> str:
    rows = ["doc length   share of tokens: source mix -> upsampled   share of documents: source mix -> upsampled"]
    for label, tb, ta, db, da in zip(bin_labels(), before["tokens"], after["tokens"], before["documents"],
                                     after["documents"]):
        rows.append(f"{label:>11}   {100 * tb:17.1f}% -> {100 * ta:8.1f}%   {100 * db:20.1f}% -> {100 * da:8.1f}%")
    return "\n".join(rows)


def write_mixture(plans: list[SourcePlan], datasets: dict[str, object], spec: MixtureSpec, output_prefix: str,
                  output_format: str = "indexed", force: bool = False, progress: bool = True) -> dict:
    """Write the planned mixture and its report; returns the report."""
    if output_format not in ("indexed", "blend"):
        raise MixtureError(f"unknown output format {output_format!r}: 'indexed' or 'blend'")
    dtype = _common_dtype(plans, datasets)
    outputs = MixtureOutputs.of(plans, output_prefix, output_format)
    all_lengths = {p.name: document_lengths(datasets[p.name]) for p in plans}
    with atomic_output_files(outputs.files(), force=force) as staged:
        mixed_lengths = _write_datasets(_document_order(plans, spec.seed), datasets, outputs, staged, dtype,
                                        progress)
        report = mixture_report(plans, spec, outputs, all_lengths, mixed_lengths)
        _write_report(report, outputs, staged)
    return report


@dataclass
class MixtureOutputs:
    """The files of one mixture: its datasets' prefixes (one, or one per source), the report, the picture and, for
    a blend, the ``--data-path`` line."""

    format: str
    datasets: dict[str, str]  # "mixture" or a source's name -> prefix
    report: str
    picture: str
    data_path: str | None = None

    @classmethod
    def of(cls, plans: list[SourcePlan], output_prefix: str, output_format: str) -> MixtureOutputs:
        blend = output_format == "blend"
        datasets = {p.name: f"{output_prefix}_{p.name}" for p in plans} if blend else {"mixture": output_prefix}
        return cls(output_format, datasets, f"{output_prefix}.mixture.json", f"{output_prefix}.length_histogram.png",
                   f"{output_prefix}.data_path.txt" if blend else None)

    def dataset_of(self, source: str) -> str:
        return source if self.format == "blend" else "mixture"

    def files(self) -> list[str]:
        from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

        extras = [self.report, self.picture] + ([self.data_path] if self.data_path else [])
        return [path(prefix) for prefix in self.datasets.values() for path in (get_bin_path, get_idx_path)] + extras


def _common_dtype(plans: list[SourcePlan], datasets: dict[str, object]):
    dtypes = {datasets[p.name].index.dtype for p in plans}
    if len(dtypes) > 1:
        raise MixtureError(f"the sources were tokenized with different vocabularies (dtypes {dtypes}): "
                           "preprocess them all with the same tokenizer", exit_code=FAILED)
    return dtypes.pop()


def _document_order(plans: list[SourcePlan], seed: int) -> list[tuple[str, int, int]]:
    """One stream of (source, document, tokens) in a seeded interleaved order (GPTDataset shuffles again anyway)."""
    order = [(p.name, doc, n) for p in plans for doc, n in p.selection]
    np.random.default_rng(seed).shuffle(order)
    return order


def _write_datasets(order, datasets: dict[str, object], outputs: MixtureOutputs, staged: dict[str, str], dtype,
                    progress: bool) -> list[tuple[str, int, int]]:
    """Copy each selected document (its first ``tokens`` tokens, sentence structure kept); returns what was
    written, in order."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
    from tqdm import tqdm

    builders = {key: IndexedDatasetBuilder(staged[get_bin_path(prefix)], dtype=dtype)
                for key, prefix in outputs.datasets.items()}
    for name, doc, n in tqdm(order, desc="writing mixture", unit="doc", disable=not progress, mininterval=1.0):
        dataset = datasets[name]
        start, stop = dataset.document_indices[doc], dataset.document_indices[doc + 1]
        sequences, left = [], n
        for sequence in dataset[int(start):int(stop)]:
            if left <= 0:
                break
            sequences.append(sequence[:left])
            left -= len(sequences[-1])
        builders[outputs.dataset_of(name)].add_document(np.concatenate(sequences), [len(s) for s in sequences])
    for key, builder in builders.items():
        builder.finalize(staged[get_idx_path(outputs.datasets[key])])
    return order


def mixture_report(plans: list[SourcePlan], spec: MixtureSpec, outputs: MixtureOutputs,
                   all_lengths: dict[str, np.ndarray], written: list[tuple[str, int, int]]) -> dict:
    """What the mixture holds against its sources: shares, epochs and the document-length histogram."""
    mixed_lengths = np.asarray([n for _, _, n in written])
    long_tokens = sum(n for name, doc, n in written if all_lengths[name][doc] >= spec.long_threshold)
    # "Before" is the same source mix without upsampling: each source's histogram at its weight.
    per_source = [(p.weight, length_histogram(all_lengths[p.name])) for p in plans]
    before = {kind: np.sum([w * np.asarray(h[kind]) for w, h in per_source], axis=0).tolist()
              for kind in ("documents", "tokens")}
    total = sum(p.budget for p in plans)
    report = {
        "spec": asdict(spec),
        "format": outputs.format,
        "outputs": outputs.datasets,
        "total_tokens": total,
        "sequences": total // spec.sequence_length,
        # Share of tokens in documents of at least long_threshold tokens: what the upsampling raises.
        "long_document_token_share": {
            "source_mix": float(sum(p.weight * all_lengths[p.name][all_lengths[p.name] >= spec.long_threshold]
                                    .sum() / max(p.tokens, 1) for p in plans)),
            "mixture": long_tokens / total},
        "sources": [{k: v for k, v in asdict(p).items() if k != "selection"} | {
            "selected_documents": len(p.selection), "share": p.budget / total} for p in plans],
        "histogram": {"bins": bin_labels(), "sources": before, "mixture": length_histogram(mixed_lengths)},
    }
    if outputs.data_path:
        report["data_path"] = " ".join(f"{p.budget} {outputs.datasets[p.name]}" for p in plans)
    return report


def _write_report(report: dict, outputs: MixtureOutputs, staged: dict[str, str]) -> None:
    from megatron_harpe.plots import plot_length_histogram

    if outputs.data_path:
        with open(staged[outputs.data_path], "w") as f:
            f.write(report["data_path"] + "\n")
    with open(staged[outputs.report], "w") as f:
        json.dump(report, f, indent=1)
    plot_length_histogram(report["histogram"], report["sources"], staged[outputs.picture])


def build_mixture(sources: list[tuple[str, str]], weighted: list[str], spec: MixtureSpec, output_prefix: str,
                  output_format: str = "indexed", force: bool = False) -> dict:
    """Check the ``(name, prefix)`` sources and the names ``--weight`` gave, open them, plan and write the mixture;
    returns the report."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = [name for name, _ in sources]
    if len(set(names)) < len(names):
        raise MixtureError(f"--source {next(n for n in names if names.count(n) > 1)} is given twice: "
                           "give each source once")
    prefixes = dict(sources)
    check_weighted_sources(weighted, names)
    for name, prefix in prefixes.items():
        if not IndexedDataset.exists(prefix):
            raise MixtureError(f"source {name}: no {prefix}.bin/.idx (give the prefix tools/preprocess_data.py "
                               "wrote, e.g. data/book_text_document)", exit_code=FAILED)
    # Kept open for the whole run: their arrays are views of memory maps closed when they are deleted.
    datasets = {canonical_source(n): IndexedDataset(prefix) for n, prefix in prefixes.items()}
    plans = plan_mixture(prefixes, spec, datasets)
    return write_mixture(plans, datasets, spec, output_prefix, output_format, force=force)
