"""The math verifier on the answer forms models write."""

from fractions import Fraction

import pytest

from jalign.rewards import math_answers as m


@pytest.mark.parametrize("response, answer", [
    ("So 3 + 4 = 7. The answer is 7.", "7"),
    ("We get \\boxed{\\frac{3}{4}} in the end", "3/4"),
    ("\\boxed{{1}}", "1"),
    ("<think>2 * 6</think><answer>12</answer>", "12"),
    ("<answer>The total is \\boxed{0.5}</answer>", "1/2"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("Answer: -15", "-15"),
    ("it costs $1,234.50 total", "1234.5"),
    ("first 3, then 5, finally 8", "8"),
    ("The answer is \\dfrac{10}{4}.", "2.5"),
    ("The answer is 50\\%", "50"),
    ("The final answer is $\\left( 2 \\right)$", "2"),
    ("The answer is x+1", "x + 1"),
])
def test_the_stated_answer_is_found_and_equal(response, answer):
  assert m.equivalent(m.extract_answer(response), answer), m.extract_answer(response)
  assert m.final_answer("", response, {"answer": answer}) == 1.0


@pytest.mark.parametrize("response, answer", [
    ("The answer is 7.", "8"),
    ("\\boxed{3/4}", "0.75001"),
    ("no numbers here", "1"),
    ("The answer is 12, not 13", "13"),
    ("<answer></answer> 5", "5"),
    ("1/0", "0"),
])
def test_wrong_or_missing_answers_score_zero(response, answer):
  assert m.final_answer("", response, {"answer": answer}) == 0.0


def test_numbers_read_exactly():
  assert m.as_number("\\frac{6}{8}") == Fraction(3, 4)
  assert m.as_number("-0.25") == Fraction(-1, 4)
  assert m.as_number("12,345") == 12345
  assert m.as_number("1,23") is None
  assert m.as_number("two") is None
  assert m.equivalent("0.5", 0.5) and not m.equivalent(None, "1")
