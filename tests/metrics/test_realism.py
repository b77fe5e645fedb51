"""The realism score against hand-computed values (1-D points, k = 1)."""

import numpy as np
import pytest

from qlip.metrics import RealismScore

REAL = np.array([[0.0], [1.0], [3.0], [7.0]])  # 1-NN radii: 1, 1, 2, 4


def test_realism_equals_the_hand_computed_maximum_ratio():
    realism = RealismScore(k=1, keep=1.0).fit(REAL)
    np.testing.assert_allclose(np.sort(realism.radii), [1, 1, 2, 4])
    # x = 0.5: max(1/0.5, 1/0.5, 2/2.5, 4/6.5) = 2; x = 5: max(1/5, 1/4, 2/2, 4/2) = 2;
    # x = 20: max(1/20, 1/19, 2/17, 4/13) = 4/13
    np.testing.assert_allclose(realism.score(np.array([[0.5], [5.0], [20.0]])), [2, 2, 4 / 13])


def test_pruning_keeps_the_smallest_half_of_the_hyperspheres():
    realism = RealismScore(k=1, keep=0.5).fit(REAL)  # only the spheres of 0 and 1 (radius 1)
    np.testing.assert_allclose(realism.score(np.array([[5.0], [0.5]])), [1 / 4, 2])


def test_k_is_the_kth_neighbour_and_bad_input_is_refused():
    realism = RealismScore(k=2, keep=1.0).fit(REAL)  # 2-NN radii: 3, 2, 3, 6
    np.testing.assert_allclose(np.sort(realism.radii), [2, 3, 3, 6])
    with pytest.raises(ValueError, match="more than k"):
        RealismScore(k=4).fit(REAL)
    with pytest.raises(RuntimeError, match="not fitted"):
        RealismScore().score(REAL)
