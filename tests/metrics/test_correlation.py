"""SROCC and PLCC against hand-computed values."""

from __future__ import annotations

import math

import pytest

from qlip.metrics import plcc, srocc


def test_srocc_hand_computed():
    # ranks d = (0, 1, 1): 1 - 6 * 2 / (3 * (9 - 1)) = 0.5
    assert srocc([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert srocc([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert srocc([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_plcc_hand_computed():
    # dx = (-1, 0, 1), dy = (-7/3, -1/3, 8/3): r = 5 / (sqrt(2) * sqrt(114) / 3) = 15 / sqrt(228)
    assert plcc([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert plcc([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        srocc([1, 2, 3], [1, 2])
