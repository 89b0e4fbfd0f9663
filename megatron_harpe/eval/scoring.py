"""Scoring rules, written down once.

* ``string_match_all`` (RULER's ``string_match_all``): the fraction of the expected strings that occur in the model's
  output, case-insensitively. A single-needle answer scores 1 or 0.
* Passkey: 1 when the first run of digits in the output is exactly the pass key, else 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def string_match_all(output: str, expected: str | Sequence[str]) -> float:
    expected = [expected] if isinstance(expected, str) else list(expected)
    if not expected:
        raise ValueError("nothing to match: give at least one expected string")
    text = output.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def passkey_score(output: str, passkey: int | str) -> float:
    found = re.search(r"\d+", output)
    return float(found is not None and found.group(0) == str(passkey))
