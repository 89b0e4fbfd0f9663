#!/usr/bin/env python
"""tools/preprocess_data.py against Megatron-LM's own tools/preprocess_data.py, side by side in one run.

    python benchmarks/preprocess.py --megatron-lm /path/to/Megatron-LM      # its tools/preprocess_data.py is run
    python benchmarks/preprocess.py --sizes 20,40,80 --workers 1,2
    python benchmarks/preprocess.py --megatron-lm DIR --text real --llama2-tokenizer   # real text, Llama-2's model

Both tools get the same JSONL corpus, the same sentencepiece model, ``--tokenizer-type T --append-eod`` and the same
``--workers``, as separate processes. The corpus is synthetic (``--text synthetic``: Fu et al.'s SlimPajama source
mix of document lengths) or real (``--text real``: this machine's own English text, Python's standard-library
docstrings, the licenses and copyright files under /usr/share, then man pages with their roff requests dropped, in a
fixed order, no document repeated). The model is a 2000-piece BPE trained here, ``--tokenizer-model``, or
``--llama2-tokenizer``: the real Llama-2 tokenizer rebuilt from llama.cpp's vocabulary (tests/llama2_spm.py; needs
``scripts/fetch_test_assets.sh`` once), with ``--tokenizer-type Llama2Tokenizer``. For each size and worker count
it records wall time, tokens written and the peak memory of the whole process tree (proportional set size, so pages
forked workers share count once; sampled every 50 ms), and checks that the two token streams (.bin and .idx) are
byte-identical. Throughput is marginal: (tokens at the largest size - tokens at the smallest) / (extra
wall time), which cancels both tools' fixed start-up (python imports of torch and megatron, ~6 s here) so the number
is what a large corpus sees; the end-to-end rate at the largest size is printed too. The contenders alternate
within each configuration. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import psutil

from measure import REPO, run_measured
OURS = os.path.join(REPO, "tools", "preprocess_data.py")
MIX = {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045, "arxiv": 0.025,
       "stackexchange": 0.02}


def make_corpus(path: str, megabytes: int, seed: int = 0) -> str:
    """A JSONL corpus of about ``megabytes`` MB with Fu et al.'s source mix (by bytes)."""
    from megatron_harpe.data.synthetic import source_documents

    if os.path.exists(path) and os.path.getsize(path) >= megabytes * 1e6 * 0.98:
        return path
    generators = {s: source_documents(s, 10**9, seed=seed + i) for i, s in enumerate(MIX)}
    written = dict.fromkeys(MIX, 0)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        total = 0
        while total < megabytes * 1e6:
            source = min(MIX, key=lambda s: written[s] / MIX[s])  # the source furthest below its share
            line = json.dumps(next(generators[source])) + "\n"
            f.write(line)
            written[source] += len(line)
            total += len(line)
    os.replace(path + ".partial", path)
    return path


def real_documents():
    """This machine's English text, in a fixed order: docstrings, licenses and copyright files, man pages."""
    import ast
    import glob
    import gzip
    import sysconfig

    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    yield doc
    for path in sorted(glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/share/doc/*/copyright")):
        try:
            yield open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
    for path in sorted(glob.glob("/usr/share/man/man*/*.gz")):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                # roff requests and comments (lines starting with "." or "'") are markup, not text.
                yield "".join(line for line in f if not line.startswith((".", "'")))
        except (UnicodeDecodeError, OSError, EOFError):
            continue


def make_real_corpus(path: str, megabytes: int) -> str:
    if os.path.exists(path) and os.path.getsize(path) >= megabytes * 1e6 * 0.98:
        return path
    total = 0
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for text in real_documents():
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            total += len(line.encode())
            if total >= megabytes * 1e6:
                break
    if total < megabytes * 1e6 * 0.98:
        os.remove(path + ".partial")
        sys.exit(f"error: this machine has only {total / 1e6:.0f} MB of real text: give smaller --sizes")
    os.replace(path + ".partial", path)
    return path


def run_tool(script: str, corpus: str, prefix: str, model: str, workers: int, tokenizer_type: str) -> dict:
    result = run_measured([sys.executable, script, "--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                           tokenizer_type, "--tokenizer-model", model, "--append-eod", "--workers", workers,
                           "--log-interval", "1000000"])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix + "_text_document")
    result["tokens"] = int(dataset.sequence_lengths.sum())
    del dataset
    return result


def same_files(prefix_a: str, prefix_b: str) -> bool:
    for suffix in ("_text_document.bin", "_text_document.idx"):
        with open(prefix_a + suffix, "rb") as a, open(prefix_b + suffix, "rb") as b:
            while True:
                block_a, block_b = a.read(1 << 24), b.read(1 << 24)
                if block_a != block_b:
                    return False
                if not block_a:
                    break
    return True


def find_megatron_script(path: str) -> str:
    if path is None:
        return None
    script = path if path.endswith(".py") else os.path.join(path, "tools", "preprocess_data.py")
    if not os.path.isfile(script):
        sys.exit(f"error: no Megatron-LM preprocess_data.py at {script}: give a Megatron-LM checkout "
                 "(git clone -b core_v0.19.0 https://github.com/NVIDIA/Megatron-LM) or the script itself")
    return script


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                   help="Megatron-LM checkout (or its tools/preprocess_data.py); $MEGATRON_LM")
    p.add_argument("--sizes", default="20,160", help="corpus sizes in MB (smallest and largest give the rate)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "harpe_preprocess_bench"))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--text", choices=("synthetic", "real"), default="synthetic")
    tokenizer = p.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer-model", help="a sentencepiece model (default: a 2000-piece BPE trained here)")
    tokenizer.add_argument("--llama2-tokenizer", action="store_true",
                           help="Llama-2's tokenizer rebuilt from llama.cpp's vocabulary (Llama2Tokenizer)")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    worker_counts = [int(w) for w in args.workers.split(",")]
    megatron = find_megatron_script(args.megatron_lm)
    if megatron is None:
        print("note: no --megatron-lm given: measuring tools/preprocess_data.py alone (no ratio, no identity check)")
    os.makedirs(args.work_dir, exist_ok=True)

    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    tokenizer_type, model = "SentencePieceTokenizer", args.tokenizer_model
    if args.llama2_tokenizer:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from llama2_spm import FETCH_HINT, build_llama2_tokenizer_model, sdist_path

        if not sdist_path().is_file():
            sys.exit(f"error: --llama2-tokenizer: no {sdist_path()}: {FETCH_HINT}")
        tokenizer_type, model = "Llama2Tokenizer", str(build_llama2_tokenizer_model(Path(args.work_dir))[0])
    elif model is None:
        model = os.path.join(args.work_dir, "bpe2k.model")
        if not os.path.exists(model):
            train_sentencepiece((FillerText(seed=s).document(20000) for s in range(20)), model[:-len(".model")],
                                vocab_size=2000)
    make = make_real_corpus if args.text == "real" else make_corpus
    corpora = {size: make(os.path.join(args.work_dir, f"corpus_{args.text}_{size}mb.jsonl"), size) for size in sizes}
    tools = {"ours": OURS} | ({"megatron-lm": megatron} if megatron else {})
    results = []
    for workers in worker_counts:
        for size in sizes:
            prefixes = {}
            for name, script in tools.items():
                prefix = os.path.join(args.work_dir, f"out_{name}_{size}_{workers}")
                for suffix in ("_text_document.bin", "_text_document.idx"):
                    if os.path.exists(prefix + suffix):
                        os.remove(prefix + suffix)
                result = run_tool(script, corpora[size], prefix, model, workers, tokenizer_type)
                result.update(tool=name, size_mb=size, workers=workers)
                results.append(result)
                prefixes[name] = prefix
                print(f"{name:>12}  {size:4d} MB  {workers} worker(s)  {result['wall_s']:7.2f} s  "
                      f"{result['tokens'] / result['wall_s'] / 1e6:6.2f} M tok/s end to end  "
                      f"peak {result['peak_pss_mib']:7.0f} MiB", flush=True)
            if megatron:
                identical = same_files(prefixes["ours"], prefixes["megatron-lm"])
                results.append({"tool": "identical", "size_mb": size, "workers": workers, "identical": identical})
                print(f"    token streams identical: {identical}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    def pick(tool, size, workers):
        return next(r for r in results if r["tool"] == tool and r["size_mb"] == size and r["workers"] == workers)

    text = "real text (docstrings, licenses, man pages)" if args.text == "real" else "synthetic JSONL, Fu et al. mix"
    print(f"\n{text}; {tokenizer_type} {os.path.basename(model)}; sizes {sizes} MB; "
          f"{psutil.cpu_count()} CPUs; marginal rate between the smallest and largest size")
    header = "| tool | workers | M tok/s (marginal) | M tok/s end to end | peak MiB per size | identical |"
    print(header)
    print("|---|---|---|---|---|---|")
    rates = {}
    for workers in worker_counts:
        for name in tools:
            small, large = pick(name, sizes[0], workers), pick(name, sizes[-1], workers)
            rate = ((large["tokens"] - small["tokens"]) / (large["wall_s"] - small["wall_s"])
                    if len(sizes) > 1 else large["tokens"] / large["wall_s"])
            rates[name, workers] = rate
            peaks = ", ".join(f"{pick(name, s, workers)['peak_pss_mib']:.0f}" for s in sizes)
            same = all(r["identical"] for r in results if r["tool"] == "identical" and r["workers"] == workers)
            print(f"| {name} | {workers} | {rate / 1e6:.2f} | {large['tokens'] / large['wall_s'] / 1e6:.2f} | "
                  f"{peaks} | {same if megatron else 'n/a'} |")
    if megatron:
        for workers in worker_counts:
            ratio = rates["ours", workers] / rates["megatron-lm", workers]
            print(f"ours / Megatron-LM at {workers} worker(s): {ratio:.2f}x (target >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
