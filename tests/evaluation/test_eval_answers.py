"""GSM8K answer extraction on hand-written generations."""

import pytest

from fwllm.evaluation.answers import flexible_answer, gold_answer, normalize_number, strict_answer


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        ("Total: 1,200 + 50 = 1,250 dollars\n#### 1,250", "1250", "1250"),
        ("#### -12", "-12", "-12"),
        ("#### $18.", "18", "18"),
        ("So the answer is 42.", None, "42"),
        ("It costs $3.50 each, so 4 cost $14.00", None, "14"),
        ("first #### 5 then #### 6", "5", "6"),
        ("The answer is 0.5 of 10, i.e. 5", None, "5"),
        ("no number at all", None, None),
        ("", None, None),
    ],
)
def test_strict_and_flexible(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


def test_normalize_number():
    assert normalize_number(" 1,000 ") == "1000"
    assert normalize_number("$5") == "5"
    assert normalize_number("2.50") == "2.50"
    assert normalize_number("7.0") == "7"
    assert normalize_number("-0") == "0"
    assert normalize_number("seven") is None


def test_gold_answer_removes_commas():
    assert gold_answer("steps <<2*3=6>>6\n#### 2,125") == "2125"
    with pytest.raises(ValueError):
        gold_answer("no final marker")
