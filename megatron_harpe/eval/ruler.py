"""RULER's eight Needle-in-a-Haystack tasks (Hsieh et al. 2024), the paper's "upgraded" NIAH (its Table 4).

Every sample: RULER's instruction, a haystack of exactly the requested length holding the needles
"One of the special magic {numbers|uuids} for {key} is: {value}." at random sentence boundaries, the question, and
RULER's answer prefix; scored with ``string_match_all`` (the share of expected values in the output).

============ ========= ======= ======= ========================================================
task         haystack  keys    values  needles
============ ========= ======= ======= ========================================================
single_1     noise     words   numbers 1
single_2     essay     words   numbers 1
single_3     essay     words   uuids   1
multikey_1   essay     words   numbers 4 keys, one asked
multikey_2   needle    words   numbers the haystack is distractor needles, one asked
multikey_3   needle    uuids   uuids   the haystack is distractor needles, one asked
multivalue   essay     words   numbers 4 values for the asked key, all expected
multiquery   essay     words   numbers 4 keys asked, all values expected
============ ========= ======= ======= ========================================================

"noise" is RULER's repeated grass/sky/sun text; "essay" is the synthetic filler here (RULER uses Paul Graham's
essays, which cannot be downloaded offline; ``--haystack-file`` takes any text).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megatron_harpe.data.synthetic import PASSKEY_GARBAGE, FillerText

TASKS = {  # name: (haystack, key kind, value kind, keys in the text, values per key, keys asked)
    "single_1": ("noise", "words", "numbers", 1, 1, 1),
    "single_2": ("essay", "words", "numbers", 1, 1, 1),
    "single_3": ("essay", "words", "uuids", 1, 1, 1),
    "multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
PAPER_TABLE_4 = {"HARPE": 86.82, "multi-stage ABF": 81.36, "single-stage ABF": 79.49}


@dataclass
class RulerSample:
    input_ids: list[int]
    answers: list[str]


class _Draw:
    def __init__(self, rng: np.random.Generator, words: list[str]):
        self.rng, self.words = rng, words

    def key(self, kind: str) -> str:
        if kind == "uuids":
            return str(uuid.UUID(int=int(self.rng.integers(0, 2**63)) << 64 | int(self.rng.integers(0, 2**63))))
        return "-".join(self.rng.choice(self.words, size=2))

    def value(self, kind: str) -> str:
        return self.key("uuids") if kind == "uuids" else str(int(self.rng.integers(1_000_000, 10_000_000)))


def ruler_sample(task: str, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], *,
                 context_tokens: int, seed: int, haystack_text: Callable[[], str] | None = None) -> RulerSample:
    """One sample of ``task`` of exactly ``context_tokens`` tokens (BOS not included)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: choose from {', '.join(TASKS)}")
    haystack_kind, key_kind, value_kind, n_keys, n_values, n_queries = TASKS[task]
    rng = np.random.default_rng(seed)
    filler = FillerText(seed)
    draw = _Draw(rng, filler.words[100:])
    keys = [draw.key(key_kind) for _ in range(n_keys)]
    values = {k: [draw.value(value_kind) for _ in range(n_values)] for k in keys}
    queried = keys[:n_queries]
    noun = "numbers" if value_kind == "numbers" else "uuids"
    needles = [f"One of the special magic {noun} for {k} is: {v}." for k in keys for v in values[k]]
    query = ", ".join(queried[:-1]) + (", and " if len(queried) > 1 else "") + queried[-1]
    prefix = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the {noun} afterwards.\n")
    question = (f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text? "
                f"The special magic {noun} for {query} mentioned in the provided text are")
    def distractor() -> str:  # the "needle" haystack: needles for other keys
        return f"One of the special magic {noun} for {draw.key(key_kind)} is: {draw.value(value_kind)}."

    text = {"noise": lambda: PASSKEY_GARBAGE, "essay": haystack_text or filler.paragraph,
            "needle": distractor}[haystack_kind]
    fixed = [encode(prefix), encode(question)] + [encode(n) for n in needles]
    budget = context_tokens - sum(map(len, fixed))
    if budget < 1:
        raise ValueError(f"context_tokens={context_tokens} is too short for RULER task {task} "
                         f"({context_tokens - budget} tokens of instructions and needles): ask for a longer context")
    ids: list[int] = []
    while len(ids) < budget:
        ids.extend(encode(text()))
    ids = ids[len(ids) - budget:]
    ends = {t for t in set(ids) if decode([t]).rstrip().endswith((".", "?", "!"))}
    boundaries = [0] + [i + 1 for i, t in enumerate(ids) if t in ends]
    # Needles at random sentence boundaries, inserted back to front so earlier positions stay valid.
    positions = sorted(rng.choice(boundaries, size=len(needles), replace=True).tolist(), reverse=True)
    for position, needle in zip(positions, rng.permutation(len(needles)).tolist()):
        ids[position:position] = fixed[2 + needle]
    answers = [v for k in queried for v in values[k]]
    return RulerSample(input_ids=fixed[0] + ids + fixed[1], answers=answers)


def table(results: dict, lengths: list[int]) -> tuple[list[str], np.ndarray]:
    """Scores (percent) per task and length, with the per-length average as the last row (the paper's Table 4)."""
    tasks = list(results)
    grid = np.array([[100 * results[t]["mean_by_length"][str(L)] for L in lengths] for t in tasks])
    return tasks + ["average"], np.vstack([grid, grid.mean(axis=0, keepdims=True)])


def ruler_settings(task: str, lengths: list[int], samples: int, max_new_tokens: int, seed: int,
                   haystack_from_file: bool) -> dict:
    """What a task's results file records (and a resumed run must match)."""
    return {"suite": "ruler", "task": task, "lengths": list(lengths), "samples": samples,
            "max_new_tokens": max_new_tokens, "seed": seed, "haystack": "file" if haystack_from_file else "synthetic"}


def results_file(out_dir: str, task: str) -> str:
    import os

    return os.path.join(out_dir, f"ruler_{task}.json")


def run_ruler(model, tasks: list[str], lengths: list[int], samples: int, out_dir: str, *, max_new_tokens: int = 64,
              batch_size: int = 1, haystack_text: Callable[[], str] | None = None, seed: int = 0,
              progress: bool = True, force: bool = False) -> dict:
    """Every task at every length, ``samples`` samples each, on the resumable grid; ``{task: results}``."""
    from megatron_harpe.eval.grid import run_grid
    from megatron_harpe.eval.scoring import string_match_all

    results = {}
    for task_index, task in enumerate(tasks):
        def make(length, index, task=task, task_index=task_index):
            sample = ruler_sample(task, model.encode, model.decode, context_tokens=length - 1,
                                  seed=int(np.random.SeedSequence([seed, task_index, length, int(index)])
                                           .generate_state(1)[0]), haystack_text=haystack_text)
            return sample.input_ids, sample.answers, {}

        settings = ruler_settings(task, lengths, samples, max_new_tokens, seed, haystack_text is not None)
        results[task] = run_grid(model, settings, lengths, list(range(samples)), make, string_match_all,
                                 results_file(out_dir, task), batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 desc=f"RULER {task}", progress=progress, tool="eval_niah --suite ruler",
                                 force=force)
    return results
