"""The misuse table (issue 15): every row of every ``tests/<part>/misuse_cases.py``, run the way a user would meet it."""

import importlib.util
from pathlib import Path

import pytest

from misuse import Misuse, run_case

HERE = Path(__file__).resolve().parent.parent  # tests/


def _load_cases():
    cases = []
    for path in sorted(HERE.rglob("misuse_cases.py")):
        spec = importlib.util.spec_from_file_location(f"misuse_cases_{path.parent.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases += module.CASES
    return cases


CASES = _load_cases()


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(isinstance(case, Misuse) for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_misuse(case, tmp_path, request, capsys):
    run_case(case, tmp_path, request.getfixturevalue, capsys)
