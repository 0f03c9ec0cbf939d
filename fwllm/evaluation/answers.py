"""Final-answer extraction for GSM8K generations.

Two readings of a model's worked solution, as is usual for GSM8K:

* strict: only the number after the ``#### `` marker the few-shot examples teach;
* flexible: the last number anywhere in the text (forgives a missing marker).

Numbers are compared as normalized strings: thousands separators, a currency sign
and a trailing full stop are dropped, and an integral decimal ("18.00") reads as "18".
"""

from __future__ import annotations

import re
from typing import Optional

_STRICT = re.compile(r"####\s*(-?[$0-9.,]*[0-9])")
# A number: optional sign and $, digits with separators/decimals, ending in a digit.
_ANY_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


def normalize_number(text: str) -> Optional[str]:
    """Canonical string of a number, or None when `text` holds no number."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", s):
        return None
    if "." in s:
        whole, frac = s.split(".")
        if set(frac) == {"0"}:
            s = whole
    if s in ("-0",):
        s = "0"
    return s


def gold_answer(solution: str) -> str:
    """The reference number of a GSM8K solution (the text after its last ``####``)."""
    tail = solution.rsplit("####", 1)[-1]
    value = normalize_number(tail)
    if value is None:
        raise ValueError(f"GSM8K solution has no final '#### N' answer: {solution[-80:]!r}")
    return value


def strict_answer(generation: str) -> Optional[str]:
    """Number after the first ``####`` marker, or None."""
    match = _STRICT.search(generation or "")
    return normalize_number(match.group(1)) if match else None


def flexible_answer(generation: str) -> Optional[str]:
    """Last number in the generation, or None."""
    found = _ANY_NUMBER.findall(generation or "")
    for candidate in reversed(found):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None
