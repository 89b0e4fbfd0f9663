"""The data commands: ``harpe-make-synthetic-corpus``, ``harpe-preprocess-data`` and ``harpe-build-long-context-mix``
(tools/make_synthetic_corpus.py, tools/preprocess_data.py, tools/build_long_context_mix.py).

The work is in :mod:`~megatron_harpe.data.synthetic`, :mod:`~megatron_harpe.data.preprocess` and
:mod:`~megatron_harpe.data.mixture`, imported after ``parse_args``: ``--help`` loads neither torch nor megatron.
"""

from __future__ import annotations

import argparse
import logging
import os

from megatron_harpe.command import UsageError, run_command
from megatron_harpe.warning_filters import filter_unactionable_warnings


def _quiet_megatron_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # one line per dataset opened otherwise


# --- harpe-make-synthetic-corpus -----------------------------------------------------------------------------------

def _retrieval_part(text: str):
    """``NAME:DOCS:TOKENS`` or ``NAME:DOCS:MIN-MAX`` as a :class:`~megatron_harpe.data.synthetic.RetrievalPart`."""
    from megatron_harpe.data.synthetic import RetrievalPart

    fields = text.split(":")
    lengths = fields[2].split("-") if len(fields) == 3 else []
    try:
        if len(fields) != 3 or len(lengths) not in (1, 2):
            raise ValueError("expected NAME:DOCS:TOKENS or NAME:DOCS:MIN-MAX")
        return RetrievalPart(fields[0], int(fields[1]), int(lengths[0]), int(lengths[-1]))
    except ValueError as e:
        raise UsageError(f"--retrieval {text}: {e} (e.g. stage0:2000:256 or stage1:200:1024-2048)") from None


def _share(text: str) -> tuple[float, float]:
    values = text.split("-")
    try:
        low, high = float(values[0]), float(values[-1])
        if len(values) > 2 or not 0.0 < low <= high <= 1.0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--task-share {text}: give a share in (0, 1], or MIN-MAX with 0 < MIN <= MAX <= 1 "
                         "(e.g. 0.5-1)") from None
    return low, high


def make_synthetic_corpus(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Synthetic per-source corpora (JSONL) and a tiny sentencepiece model, "
                                            "offline: the embedded default for preprocessing, mixing and training. "
                                            "With --retrieval: documents that carry the evaluation's retrieval "
                                            "tasks (passkey, NIAH, RULER) and their answers instead.",
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--docs-per-source", type=int, help="per-source corpora: documents per source (default 200)")
    p.add_argument("--length-scale", type=float,
                   help="per-source corpora: scales every source's document lengths (default 0.25)")
    p.add_argument("--retrieval", action="append", metavar="NAME:DOCS:TOKENS[-MAX]",
                   help="a part of a retrieval-rich corpus, OUT/parts/NAME.jsonl: DOCS documents of TOKENS (or "
                        "TOKENS to MAX) tokens each as tools/preprocess_data.py --append-eod writes them (text + "
                        "EOD; a part at --seq-length tokens fills Megatron's training samples one document each); "
                        "repeat for more parts, all sharing OUT/tokenizer.model")
    p.add_argument("--retrieval-kinds", help="with --retrieval: comma-separated tasks to mix (default all: passkey, "
                                             "niah-classic, niah-ruler, niah-lwm, ruler-single_1 ... "
                                             "ruler-multiquery)")
    p.add_argument("--task-share", help="with --retrieval: the share of a document its task takes, MIN-MAX in (0, 1] "
                                        "(default 1: prompt and answer fill it; less leaves filler after the answer)")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    filter_unactionable_warnings()

    def check_retrieval_args():
        from megatron_harpe.data.synthetic import retrieval_kinds

        if args.vocab_size < 300:
            raise UsageError("--vocab-size >= 300 please")
        if not args.retrieval:
            given = [flag for flag, value in (("--retrieval-kinds", args.retrieval_kinds),
                                              ("--task-share", args.task_share)) if value is not None]
            if given:
                raise UsageError(f"{' and '.join(given)} only apply with --retrieval")
            return None
        given = [flag for flag, value in (("--docs-per-source", args.docs_per_source),
                                          ("--length-scale", args.length_scale)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} describe per-source corpora: drop them with --retrieval "
                             "(each part gives its own documents and lengths)")
        parts = [_retrieval_part(text) for text in args.retrieval]
        names = [part.name for part in parts]
        if len(set(names)) != len(names):
            raise UsageError(f"--retrieval: part names must differ, got {', '.join(names)}")
        kinds = None
        if args.retrieval_kinds is not None:
            kinds = [kind.strip() for kind in args.retrieval_kinds.split(",") if kind.strip()]
            unknown = [kind for kind in kinds if kind not in retrieval_kinds()]
            if unknown or not kinds:
                raise UsageError(f"--retrieval-kinds {args.retrieval_kinds}: unknown {', '.join(unknown) or 'empty'}; "
                                 f"choose from {', '.join(retrieval_kinds())}")
        share = _share(args.task_share) if args.task_share is not None else (1.0, 1.0)
        return parts, kinds, share

    def body() -> None:
        from megatron_harpe.data.synthetic import make_corpus, make_retrieval_corpus
        from megatron_harpe.outputs import atomic_output_dir

        retrieval = check_retrieval_args()
        if retrieval is not None:
            parts, kinds, share = retrieval
            try:
                with atomic_output_dir(args.out, force=args.force) as tmp:
                    made = make_retrieval_corpus(tmp, parts, args.vocab_size, args.seed, kinds, share)
            except ValueError as e:  # a part too short for a task: nothing was written
                raise UsageError(str(e)) from None
            for name, path in made["parts"].items():
                print(f"{name:>14}: {os.path.join(args.out, 'parts', os.path.basename(path))}")
            print(f"tokenizer model: {os.path.join(args.out, 'tokenizer.model')}")
            return
        docs = 200 if args.docs_per_source is None else args.docs_per_source
        scale = 0.25 if args.length_scale is None else args.length_scale
        if docs < 1 or scale <= 0:
            raise UsageError("--docs-per-source >= 1 and --length-scale > 0 please")
        with atomic_output_dir(args.out, force=args.force) as tmp:
            made = make_corpus(tmp, docs, scale, args.vocab_size, args.seed)
        for source, path in made["sources"].items():
            print(f"{source:>14}: {os.path.join(args.out, 'sources', os.path.basename(path))}")
        print(f"tokenizer model: {os.path.join(args.out, 'tokenizer.model')}")

    return run_command(body)


# --- harpe-preprocess-data -----------------------------------------------------------------------------------------

def preprocess_data_parser() -> argparse.ArgumentParser:
    """Megatron-LM's ``tools/preprocess_data.py`` flags (its tokenizer flags, mirrored without importing megatron),
    plus ours; abbreviations are refused (Megatron-LM's scripts spell its flags out)."""
    from megatron_harpe.data.tokenizer import add_megatron_tokenizer_args

    parser = argparse.ArgumentParser(description="Tokenize JSONL (or plain text) into Megatron .bin/.idx datasets.",
                                     allow_abbrev=False)
    parser = add_megatron_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", required=True,
                       help="JSON lines (.jsonl/.json, gzipped too), plain-text files (one document each), a glob "
                            "or a directory")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    group.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (nltk punkt)")
    group.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    group.add_argument("--lang", default="english", help="punkt language when nltk has its data installed")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOD to every document")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True, help="output path without the _{key}_{level}.bin suffix")
    group.add_argument("--force", action="store_true", help="replace existing output files")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="encoding processes (the main one reads and writes); 0 encodes in the main process")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for Megatron-LM scripts; the input is streamed once whatever its size")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron-LM scripts; input order is always kept")
    group.add_argument("--log-interval", type=int, default=1000, help="accepted for Megatron-LM scripts (tqdm shows "
                                                                     "progress)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="count and skip malformed lines instead of stopping at the first one")
    return parser


def preprocess_data(argv: list[str] | None = None) -> int:
    _quiet_megatron_logging()
    args = preprocess_data_parser().parse_args(argv)
    filter_unactionable_warnings()

    def body() -> None:
        from megatron_harpe.data.preprocess import preprocess

        result = preprocess(args)
        for key, prefix in result.outputs.items():
            print(f"wrote {prefix}.bin/.idx: {result.documents} documents, {result.sequences[key]} sequences, "
                  f"{result.tokens[key]} tokens")
        total = sum(result.tokens.values())
        print(f"{total / max(result.seconds, 1e-9) / 1e6:.2f}M tokens/s ({result.encoder}; {args.workers} worker(s))"
              + (f"; sentences: {result.splitter}" if result.splitter else "")
              + (f"; skipped {result.bad_lines} bad line(s)" if result.bad_lines else ""))

    # FileNotFoundError/PermissionError: the tokenizer model or an input file; ValueError: megatron's tokenizer
    # refusing its flags.
    return run_command(body, usage=(ValueError,), failures=(FileNotFoundError, PermissionError))


# --- harpe-build-long-context-mix ----------------------------------------------------------------------------------

def build_long_context_mix_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-source length-upsampled long-context mixture (Fu et al. 2024).",
                                allow_abbrev=False)
    p.add_argument("--source", action="append", required=True, metavar="NAME=PREFIX",
                   help="a source's indexed dataset (tools/preprocess_data.py output prefix, without .bin); repeat")
    p.add_argument("--spec", help="JSON file with any of: weights, long_threshold, short_keep_probability, "
                                  "target_tokens, sequence_length, seed (flags override it)")
    p.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="a source's share, replacing only that source's default (SlimPajama's, as Fu et al.); "
                        "weights are renormalized over the sources given; repeat")
    p.add_argument("--long-threshold", type=int, help="documents this long (tokens) are all kept (default 4096)")
    p.add_argument("--short-keep-probability", type=float, help="shorter documents are kept with this (default 0.1)")
    p.add_argument("--target-tokens", type=float, help="mixture size (default: no kept document repeated)")
    p.add_argument("--seq-length", type=int, help="training sequence length the size rounds to (default 131072)")
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=["indexed", "blend"], default="indexed",
                   help="one indexed dataset, or one per source plus a --data-path blend")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    return p


def _name_value(text: str) -> tuple[str, str]:
    from megatron_harpe.data.mixture import MixtureError

    if "=" not in text:
        raise MixtureError(f"{text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def mixture_spec(args: argparse.Namespace):
    """The :class:`~megatron_harpe.data.mixture.MixtureSpec` of ``--spec`` with the flags given over it."""
    from megatron_harpe.data.mixture import MixtureSpec, with_weights

    spec = MixtureSpec.from_json(args.spec) if args.spec else MixtureSpec()
    spec.weights = with_weights(spec.weights, map(_name_value, args.weight), "--weight")
    for flag, attr in (("long_threshold", "long_threshold"), ("short_keep_probability", "short_keep_probability"),
                       ("seq_length", "sequence_length"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            setattr(spec, attr, getattr(args, flag))
    if args.target_tokens is not None:
        spec.target_tokens = int(args.target_tokens)
    return spec


def build_long_context_mix(argv: list[str] | None = None) -> int:
    _quiet_megatron_logging()
    args = build_long_context_mix_parser().parse_args(argv)
    filter_unactionable_warnings()

    def body() -> None:
        from megatron_harpe.data.mixture import build_mixture, histogram_table

        spec = mixture_spec(args)
        sources = [_name_value(text) for text in args.source]
        weighted = [name for name, _ in map(_name_value, args.weight)]
        report = build_mixture(sources, weighted, spec, args.output_prefix, args.format, force=args.force)
        print(f"{'source':>14} {'weight':>7} {'share':>7} {'docs':>9} {'kept':>9} {'tokens':>13} {'epochs':>7}")
        for source in report["sources"]:
            print(f"{source['name']:>14} {source['weight']:7.3f} {source['share']:7.3f} {source['documents']:9d} "
                  f"{source['kept_documents']:9d} {source['budget']:13d} {source['epochs']:7.2f}")
        print(histogram_table(report["histogram"]["sources"], report["histogram"]["mixture"]))
        share = report["long_document_token_share"]
        print(f"tokens in documents >= {spec.long_threshold} tokens: {100 * share['source_mix']:.1f}% of the source "
              f"mix, {100 * share['mixture']:.1f}% of the upsampled mixture")
        print(f"{report['total_tokens']} tokens = {report['sequences']} sequences of {spec.sequence_length}; "
              f"wrote {', '.join(report['outputs'].values())} (+ .mixture.json, .length_histogram.png"
              + (", .data_path.txt" if args.format == "blend" else "") + ")")

    # ValueError/OSError: a dataset megatron cannot open, a spec file that cannot be read.
    return run_command(body, failures=(ValueError, OSError))
