"""FID: exact closed forms, sampling agreement, batching of image iterables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlip.metrics import (
    GaussianStatistics,
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_from_images,
    frechet_distance,
)
from qlip.metrics.fid import rebatch
from tests.metrics.fakes import MeanColourExtractor


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.5 * np.eye(dim)


def test_identical_sets_have_zero_fid():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(fid_from_features(features, features)) < 1e-6


def test_commuting_covariances_match_closed_form():
    # N(m1, diag(a)) vs N(m2, diag(b)): ||m1 - m2||^2 + sum(a + b - 2 sqrt(ab)).
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + np.sum(a + b - 2 * np.sqrt(a * b))  # = 5 + (1 + 1 + 4)
    got = frechet_distance(
        GaussianStatistics(m1, np.diag(a), 0), GaussianStatistics(m2, np.diag(b), 0)
    )
    assert got == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(11.0)


def test_general_covariances_match_trace_formula_and_are_symmetric():
    rng = np.random.default_rng(1)
    s1, s2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), computed here from eigendecompositions.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    forward = frechet_distance(GaussianStatistics(m1, s1, 0), GaussianStatistics(m2, s2, 0))
    backward = frechet_distance(GaussianStatistics(m2, s2, 0), GaussianStatistics(m1, s1, 0))
    assert forward == pytest.approx(expected, rel=1e-8)
    assert backward == pytest.approx(expected, rel=1e-8)


def test_samples_converge_to_the_exact_distance():
    rng = np.random.default_rng(2)
    s1, s2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
    m1, m2 = np.zeros(4), np.full(4, 0.5)
    exact = frechet_distance(GaussianStatistics(m1, s1, 0), GaussianStatistics(m2, s2, 0))
    x = rng.multivariate_normal(m1, s1, size=40_000)
    y = rng.multivariate_normal(m2, s2, size=40_000)
    assert fid_from_features(x, y) == pytest.approx(exact, rel=0.03)


def test_statistics_are_float64_and_unbiased():
    features = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float32)
    stats = feature_statistics(features)
    assert stats.mean.dtype == np.float64 and stats.count == 2
    np.testing.assert_allclose(stats.covariance, [[2.0, 2.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        feature_statistics(torch.zeros(1, 3))


def test_rebatch_joins_singles_and_batches_into_fixed_batches():
    images = [torch.zeros(3, 4, 4), torch.zeros(5, 3, 4, 4), torch.zeros(3, 4, 4)]
    assert [len(b) for b in rebatch(images, 3)] == [3, 3, 1]
    assert [len(b) for b in rebatch(torch.zeros(7, 3, 4, 4), 4)] == [4, 3]


def test_fid_from_images_equals_fid_of_directly_computed_features():
    g = torch.Generator().manual_seed(3)
    real = torch.rand(40, 3, 8, 8, generator=g)
    fake = (torch.rand(40, 3, 8, 8, generator=g) * 0.8 + 0.1).clamp(0, 1)
    extractor = MeanColourExtractor()
    direct = fid_from_features(extractor.global_features(real), extractor.global_features(fake))
    as_iterable = fid_from_images(extractor, list(real.split(7)), iter(fake), batch_size=16)
    assert as_iterable == pytest.approx(direct, rel=1e-9)
    assert direct > 0


def test_images_outside_unit_range_are_rejected_with_advice():
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        extract_features(MeanColourExtractor().global_features, torch.full((2, 3, 4, 4), -1.0))


def test_fewer_samples_than_dimensions_still_gives_a_finite_distance():
    g = torch.Generator().manual_seed(4)
    few = torch.randn(20, 50, generator=g)  # covariance of rank 19 in 50-D: singular
    assert abs(fid_from_features(few, few)) < 1e-4  # sqrtm of a singular matrix: ~1e-6 error
    shifted = fid_from_features(few, few + 1.0)
    assert shifted == pytest.approx(50.0, abs=1e-4)  # only the mean term: 50 * 1^2
