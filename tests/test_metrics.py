"""Generation metrics on tiny hand-checked cases."""

from __future__ import annotations

import pytest

from tuneforge.eval.metrics import chrf, exact_match, normalize, normalized_exact_match, rouge_l


def test_exact_and_normalized_match():
    assert exact_match(" 2021-03-03 ", "2021-03-03") == 1.0
    assert exact_match("2021-03-04", "2021-03-03") == 0.0
    assert normalize("The Cat, sat!") == "cat sat"
    assert normalized_exact_match("the cat sat.", "Cat sat") == 1.0


def test_rouge_l_and_chrf():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat mat": precision 3/3, recall 3/6 -> F1 = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert chrf("abc", "abc") == pytest.approx(1.0)
    assert 0.0 < chrf("2021-03-04", "2021-03-03") < 1.0
    assert chrf("zzzz", "2021-03-03") == pytest.approx(0.0)
