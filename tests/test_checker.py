"""The sample task's checker: the value (any phrasing, other variables restated or not) and the ending."""

from __future__ import annotations

import random

import pytest

from orpolab.demo.sample_task import LookupChecker

Z = "Let z = 5. What is z?"
K = "Let p = 17, k = 42 and w = 8. What is k?"


@pytest.mark.parametrize(("question", "answer", "ended", "value_right", "exact"), [
    (Z, "z = 5.", True, True, True),                        # how a real model answers
    (Z, "The answer is 5.", True, True, True),
    (Z, "5", True, True, True),
    (Z, "z = 5. The answer is 5.", True, True, True),       # the task's own phrasing
    (K, "p = 17, k = 42 and w = 8. The answer is 42.", True, True, True),  # restating the others is fine
    (K, "k is 42.", True, True, True),
    (Z, "z = 5.", False, True, False),                      # cut off by the token budget: not exact
    (Z, "z = 5. The answer is 5. z = 5. The answer is 5.", True, True, False),  # repeats itself
    (Z, "z = 6.", True, False, False),
    (K, "k = 17.", True, False, False),                     # another variable's value
    (Z, "z = 5. The answer is 6.", True, False, False),     # two values for z
    (K, "p = 17.", True, False, False),                     # states no value for k
    (Z, "I do not know.", True, False, False),
])
def test_value_right_and_exact(question, answer, ended, value_right, exact):
    assert LookupChecker().check(answer, 5 if question == Z else 42, question, ended) == {
        "value_right": value_right, "exact": exact}


def test_calibration_examples_are_one_right_one_wrong_and_never_the_reference():
    checker, rng = LookupChecker(), random.Random(0)
    for _ in range(50):
        right, wrong = checker.examples(K, 42, rng)
        assert checker.check(right, 42, K, True)["value_right"]
        assert not checker.check(wrong, 42, K, True)["value_right"]
        assert checker.reference(42) not in (right, wrong)
