"""One comparison, step by step, through the project's chain; a finished step is never run twice.

corpus (``data.synthetic``) -> ``harpe-preprocess-data`` -> stage 0: ``pretrain_harpe.py`` from scratch at L0 ->
stage 1: one ``pretrain_harpe.py`` run per method, seed (and ABF stage) from stage 0's checkpoint ->
``harpe-convert-megatron-to-hf`` -> the eval tools (:mod:`~megatron_harpe.compare.evaluate`) -> the report.

Training runs as its own process (megatron's global state is per process), with its log in ``OUT/logs``; the
export and the evaluations run here, through the commands' own entry points. Every step ends by writing its marker
(``NAME.done``, beside what it wrote); an interrupted comparison resumes at the first step without one (an
interrupted training from its last checkpoint, as ``--load`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from megatron_harpe import recipes
from megatron_harpe.command import UsageError
from megatron_harpe.compare.logs import failed, run_entry
from megatron_harpe.compare.methods import LABELS, Stage, rope_flags, stages
from megatron_harpe.compare.presets import ComparePreset, Training

MANIFEST = "compare.json"
# What a comparison writes in OUT: --force removes these, and refuses when OUT holds anything else.
WRITTEN = ("corpus", "corpus.done", "data", "stage0", "runs", "logs", MANIFEST, "results.json", "results.md",
           "pictures")
STAGE0_SEED = 1234
# pretrain_harpe.py's body: `-c` keeps the child from re-importing a main file (megatron's torch_dist writer spawns).
PRETRAIN = ("from megatron_harpe.warning_filters import filter_unactionable_warnings; "
            "filter_unactionable_warnings(); import sys; from megatron_harpe.training.entry import main; "
            "sys.exit(main())")


def seed_of(index: int) -> int:
    """Stage 1's seed (data order) for seed number ``index`` (1-based): the same for every method."""
    return 1000 + index


class Paths:
    """Where each step writes, under OUT."""

    def __init__(self, root: str):
        self.root = root
        self.corpus, self.data, self.stage0, self.runs, self.logs = (
            os.path.join(root, name) for name in ("corpus", "data", "stage0", "runs", "logs"))

    def data_prefix(self, part: str) -> str:
        return os.path.join(self.data, f"{part}_text_document")

    def run(self, method: str, seed: int) -> str:
        return os.path.join(self.runs, method, f"seed{seed}")

    @staticmethod
    def checkpoints(run: str, stage: int, n_stages: int) -> str:
        return os.path.join(run, f"stage{stage}" if n_stages > 1 else "", "checkpoints")


# Summary keys a resumed --out may differ in: more seeds later reuse the finished ones; the description is prose.
NOT_SETTINGS = ("seeds", "description")


def prepare_out(out: str, summary: dict, force: bool) -> None:
    """Make OUT, resume it (same preset, any seeds), or refuse; ``force`` clears what a comparison wrote, nothing
    else."""
    summary = {k: v for k, v in summary.items() if k not in NOT_SETTINGS}
    manifest = os.path.join(out, MANIFEST)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file: give a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    foreign = [e for e in entries if e not in WRITTEN]
    if entries and foreign:
        raise UsageError(f"--out {out} holds {', '.join(foreign)}, which compare_methods did not write: "
                         "choose another --out" + (" (--force would not delete them)" if force else ""))
    if entries and not force:
        try:
            with open(manifest) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"--out {out} has no readable {MANIFEST}: pass --force to start it over") from None
        current = json.loads(json.dumps(summary))
        changed = sorted(k for k in (set(previous) | set(current)) - set(NOT_SETTINGS)  # older manifests hold them
                         if previous.get(k) != current.get(k))
        if changed:
            raise UsageError(f"--out {out} holds a comparison with other settings ({', '.join(changed)}): choose "
                             "another --out, or pass --force to replace it")
        return
    for entry in entries:
        path = os.path.join(out, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(manifest, "w") as f:
        json.dump(summary, f, indent=1)


class Runner:
    def __init__(self, preset: ComparePreset, out: str, methods: list[str], *, log: Callable[[str], None] = print):
        self.preset, self.paths, self.methods, self.log = preset, Paths(out), methods, log
        self.total = 3 + 3 + len(methods) * preset.seeds * 3
        self.done = 0

    # --- the steps --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from megatron_harpe.compare.report import write_report

        start = time.monotonic()
        root, p = self.paths.root, self.preset
        self._step("corpus", os.path.join(root, "corpus"), self._corpus)
        for part in ("stage0", "stage1"):
            self._step(f"preprocess {part}", os.path.join(self.paths.data, part),
                       lambda part=part: self._preprocess(part))
        stage0 = self.paths.stage0
        # Stage 0's RoPE is the "none" method's: Llama-2's base.
        train0 = Stage(p.l0, p.stage0.global_batch_size, p.stage0.iters, tuple(rope_flags("none", p)))
        self._step("stage 0: pretrain at L0 from scratch", os.path.join(stage0, "train"),
                   lambda: self._pretrain("stage0", train0, p.stage0, "stage0", self.paths.checkpoints(stage0, 1, 1),
                                          "", STAGE0_SEED))
        self._export_and_evaluate("stage 0", stage0, self.paths.checkpoints(stage0, 1, 1))
        for method in self.methods:
            for index in range(1, p.seeds + 1):
                self._stage1(method, index)
        results = write_report(p, root, self.methods)
        self.log(f"compare_methods: done in {time.monotonic() - start:.0f} s; {os.path.join(root, 'results.md')}")
        return results

    def _stage1(self, method: str, index: int) -> None:
        run = self.paths.run(method, index)
        plan = stages(method, self.preset)
        what = f"{LABELS[method]}, seed {index}"

        def train():
            previous = self.paths.checkpoints(self.paths.stage0, 1, 1)
            for number, stage in enumerate(plan, 1):
                save = self.paths.checkpoints(run, number, len(plan))
                self._pretrain(f"{method}-seed{index}-stage{number}", stage, self.preset.stage1, "stage1", save,
                               previous, seed_of(index))
                previous = save

        self._step(f"stage 1: {what}", os.path.join(run, "train"), train)
        self._export_and_evaluate(what, run, self.paths.checkpoints(run, len(plan), len(plan)))

    def _export_and_evaluate(self, what: str, run: str, checkpoints: str) -> None:
        from megatron_harpe.compare.evaluate import evaluate

        hf, evaluation = os.path.join(run, "hf"), os.path.join(run, "eval")
        self._step(f"{what}: export to Hugging Face", os.path.join(run, "export"),
                   lambda: self._export(checkpoints, hf))
        self._step(f"{what}: evaluate", os.path.join(run, "evaluate"), lambda: evaluate(hf, evaluation, self.preset))

    # --- what each step does ----------------------------------------------------------------------------------

    def _corpus(self) -> None:
        from megatron_harpe.data.synthetic import RetrievalPart, make_retrieval_corpus

        # Documents of exactly the training length: each is one sample, no task cut in two.
        p = self.preset
        make_retrieval_corpus(self.paths.corpus, [RetrievalPart("stage0", p.stage0.docs, p.l0, p.l0),
                                                  RetrievalPart("stage1", p.stage1.docs, p.l1, p.l1)],
                              vocab_size=p.vocab_size, seed=0, kinds=p.kinds)

    def _preprocess(self, part: str) -> None:
        from megatron_harpe.data.cli import preprocess_data

        os.makedirs(self.paths.data, exist_ok=True)
        argv = ["--input", os.path.join(self.paths.corpus, "parts", f"{part}.jsonl"),
                "--output-prefix", os.path.join(self.paths.data, part), "--tokenizer-type", "Llama2Tokenizer",
                "--tokenizer-model", self._tokenizer, "--append-eod", "--workers", "1", "--force"]
        self._command(f"preprocess-{part}", preprocess_data, argv)

    @property
    def _tokenizer(self) -> str:
        return os.path.join(self.paths.corpus, "tokenizer.model")

    def _pretrain(self, name: str, stage: Stage, training: Training, part: str, save: str, load: str,
                  seed: int) -> None:
        from megatron_harpe.distributed import free_port

        run_dir = os.path.dirname(save)
        os.makedirs(run_dir, exist_ok=True)
        flags = pretrain_flags(self.preset, stage, training, save=save, load=load,
                               data_prefix=self.paths.data_prefix(part), tokenizer=self._tokenizer, seed=seed,
                               metrics_file=os.path.join(run_dir, "metrics.jsonl"))
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        # One thread unless asked otherwise (as torchrun gives each of several ranks): on a busy 2-core machine
        # torch's default threads ran the compact engine 8-10x slower, with the same losses bit for bit.
        env.setdefault("OMP_NUM_THREADS", "1")
        log_path = self._log_path(name)
        with open(log_path, "a") as log:
            log.write("$ pretrain_harpe.py " + " ".join(flags) + "\n")
            log.flush()
            status = subprocess.run([sys.executable, "-c", PRETRAIN, *flags], env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise failed(f"training {name}", status, log_path)

    def _export(self, checkpoints: str, hf: str) -> None:
        from megatron_harpe.convert.cli import megatron_to_hf

        # --allow-pickle: a torch_dist checkpoint's .metadata is a pickle, written by this comparison's own run.
        self._command(f"export-{os.path.relpath(hf, self.paths.root).replace(os.sep, '-')}", megatron_to_hf,
                      ["--megatron-dir", checkpoints, "--out", hf, "--allow-pickle", "--tokenizer-model",
                       self._tokenizer, "--force"])

    def _command(self, name: str, entry: Callable[[list[str]], int], argv: list[str]) -> None:
        run_entry(entry, argv, self._log_path(name), name)

    def _log_path(self, name: str) -> str:
        os.makedirs(self.paths.logs, exist_ok=True)
        return os.path.join(self.paths.logs, f"{name}.log")

    def _step(self, what: str, name: str, body: Callable[[], None]) -> None:
        """``body`` unless its marker (``name``.done) says it finished before; the marker is written last."""
        self.done += 1
        marker = f"{name}.done"
        prefix = f"[{self.done}/{self.total}] {what}"
        if os.path.exists(marker):
            self.log(f"{prefix}: done before, skipped")
            return
        self.log(f"{prefix} ...")
        start = time.monotonic()
        body()
        seconds = time.monotonic() - start
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            json.dump({"step": what, "seconds": round(seconds, 1)}, f)
        self.log(f"{prefix}: {seconds:.0f} s")


def pretrain_flags(preset: ComparePreset, stage: Stage, training: Training, *, save: str, load: str,
                   data_prefix: str, tokenizer: str, seed: int, metrics_file: str) -> list[str]:
    """pretrain_harpe.py's flags for one training run: the recipes' shared part, the stage's RoPE, the engine."""
    # No validation split: the eval tools are the measure, and a split share holding no document of a small
    # corpus sends megatron's GPTDataset into an endless epoch count (_get_num_epochs).
    settings = recipes.Settings(
        nnodes=1, gpus_per_node=1, seq_length=stage.seq_length,
        micro_batch_size=min(preset.micro_batch_size, stage.global_batch_size),
        global_batch_size=stage.global_batch_size, train_iters=stage.train_iters, lr=training.lr,
        warmup_iters=min(training.warmup_iters, stage.train_iters - 1), save_interval=stage.train_iters,
        log_interval=max(1, stage.train_iters // 20), eval_interval=stage.train_iters, eval_iters=0, seed=seed,
        cpu=True, save=save, load=load, data_path=(data_prefix,), tokenizer_model=tokenizer, split="100,0,0")
    # Megatron keeps a flag's last value: these replace the recipes' constant schedule.
    schedule = ["--lr-decay-style", "cosine", "--min-lr", training.min_lr] if training.min_lr else []
    engine = ["--harpe-engine", "compact"] if preset.compact_engine else []
    return [*recipes.base_flags(preset.shape, settings), *recipes.run_flags(settings), *schedule, *stage.rope,
            *engine, "--harpe-metrics-file", metrics_file, *preset.extra_flags]
