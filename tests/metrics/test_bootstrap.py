"""Bootstrap intervals and KID against closed forms; the weighted (vectorised) statistics against
the plain estimators they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlip.metrics import fid_from_features
from qlip.metrics.bootstrap import (
    BootstrapConfig,
    bootstrap_frechet,
    bootstrap_mmd,
    frechet_by_eigenvalues,
    interval,
    resample_counts,
    weighted_means,
)
from qlip.metrics.kid import kernel_matrices, kid_from_features, kid_with_torchmetrics


def _normal(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_counts_are_draws_with_replacement():
    counts = resample_counts(50, 300, seed=3)
    assert counts.shape == (300, 50) and torch.all(counts.sum(1) == 50)
    # each image is drawn with probability 1/n per slot: mean count 1, variance 1 - 1/n
    assert counts.mean().item() == pytest.approx(1.0)
    assert counts.var().item() == pytest.approx(1 - 1 / 50, rel=0.05)
    assert torch.equal(counts, resample_counts(50, 300, seed=3))


def test_interval_of_a_gaussian_mean_matches_the_normal_theory():
    x = _normal(400, 1, seed=0, scale=2.0).squeeze(1).numpy()
    counts = resample_counts(len(x), 2000, seed=1)
    got = interval(float(x.mean()), weighted_means(counts, x))
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))  # ≈ 0.196
    assert got.low == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert got.high == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_weighted_frechet_with_unit_counts_is_the_scipy_fid():
    a, b = _normal(300, 16, 0, 3.0, 5.0), _normal(300, 16, 1, 3.3, 5.2)
    ones = torch.ones(1, 300, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = bootstrap_frechet(a, b, ones, config=BootstrapConfig(dtype=dtype))
        assert got.item() == pytest.approx(fid_from_features(a, b), rel=1e-4)


def test_fid_by_eigenvalues_is_the_scipy_fid():
    a, b = _normal(300, 16, 0, 3.0, 5.0), _normal(200, 16, 1, 3.3, 5.2)
    assert frechet_by_eigenvalues(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-9)


def test_weighted_frechet_equals_fid_of_the_materialised_resample():
    a, b = _normal(120, 6, 0), _normal(120, 6, 1, 1.2)
    counts = resample_counts(120, 3, seed=5)
    got = bootstrap_frechet(a, b, counts, config=BootstrapConfig(dtype=torch.float64))
    for row, value in zip(counts, got):
        index = torch.repeat_interleave(torch.arange(120), row.long())
        assert value.item() == pytest.approx(fid_from_features(a[index], b[index]), rel=1e-8)


def test_frechet_of_singular_covariances_falls_back_to_the_symmetric_root():
    # fewer images than dims: Σ_a is singular, so no Cholesky factor exists; mixed batches take
    # the factor where it exists and the root elsewhere, with the same values as the scipy FID
    small_a, small_b = _normal(12, 20, 0, 2.0), _normal(12, 20, 1, 2.5, 0.3)
    big_a, big_b = _normal(200, 20, 2, 2.0), _normal(200, 20, 3, 2.5, 0.3)
    config = BootstrapConfig(dtype=torch.float64)
    ones = torch.ones(1, 12, dtype=torch.float64)
    got = bootstrap_frechet(small_a, small_b, ones, config=config).item()
    want = fid_from_features(small_a.numpy(), small_b.numpy())
    assert got == pytest.approx(want, rel=1e-6)
    # one batch: a resample that drops most images (singular) beside a full one
    counts = torch.zeros(2, 200, dtype=torch.float64)
    counts[0, :10] = 20.0  # 10 distinct images, each 20 times: rank 9 < 20 dims
    counts[1] = 1.0
    values = bootstrap_frechet(big_a, big_b, counts, config=config)
    assert values[0].item() == pytest.approx(
        fid_from_features(big_a[:10].repeat(20, 1).numpy(), big_b[:10].repeat(20, 1).numpy()),
        rel=1e-6)
    assert values[1].item() == pytest.approx(fid_from_features(big_a, big_b), rel=1e-8)


def test_fid_interval_covers_the_estimate_and_shrinks_with_more_images():
    widths = []
    for n in (200, 800):
        a, b = _normal(n, 8, 0), _normal(n, 8, 1, 1.3)
        estimate = fid_from_features(a, b)
        got = interval(estimate, bootstrap_frechet(a, b, resample_counts(n, 200, seed=0)))
        assert got.low < estimate < got.high
        widths.append(got.high - got.low)
    assert widths[1] < 0.7 * widths[0]  # ~1/sqrt(n): 0.5 expected


def test_kid_of_identical_sets_is_the_closed_form_and_vanishes_as_1_over_m():
    # Unbiased MMD² of a set with itself: the cross term keeps the m diagonal pairs the
    # within terms drop, so it is 2[(S - T)/(m(m-1)) - S/m²] (S = ΣK, T = tr K) = O(1/m).
    values = []
    for m in (300, 1200):
        a = _normal(m, 8, 0)
        kernel = kernel_matrices(a, a)[0]
        total, trace = kernel.sum().item(), kernel.trace().item()
        closed = 2 * ((total - trace) / (m * (m - 1)) - total / m**2)
        assert kid_from_features(a, a) == pytest.approx(closed, rel=1e-9)
        values.append(abs(closed))
    assert values[1] == pytest.approx(values[0] / 4, rel=0.2)


def test_kid_of_two_draws_is_near_zero_and_of_shifted_sets_positive():
    a = _normal(300, 8, 0)
    assert abs(kid_from_features(a, _normal(300, 8, 1))) < 0.01  # two draws: ~0
    assert kid_from_features(a, _normal(300, 8, 1, shift=1.0)) > 0.1


def test_kid_matches_torchmetrics_and_the_weighted_form():
    a, b = _normal(200, 8, 0), _normal(200, 8, 1, 1.2, 0.3)
    expected = kid_with_torchmetrics(a, b)
    assert kid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    ones = torch.ones(1, 200, dtype=torch.float64)
    assert bootstrap_mmd(*kernel_matrices(a, b), ones).item() == pytest.approx(expected, rel=1e-9)


def test_kid_resample_drops_duplicate_pairs():
    # A resample that draws each of 3 distinct images twice: the estimate sees only those 3.
    a, b = _normal(6, 4, 0), _normal(6, 4, 1)
    counts = torch.tensor([[2.0, 2, 2, 0, 0, 0]], dtype=torch.float64)
    got = bootstrap_mmd(*kernel_matrices(a, b), counts).item()
    assert got == pytest.approx(kid_from_features(a[:3], b[:3]), rel=1e-9)


def test_paired_kid_of_a_set_with_itself_is_exactly_zero():
    a = _normal(300, 8, 0)
    assert kid_from_features(a, a, paired=True) == pytest.approx(0.0, abs=1e-12)


def test_paired_kid_is_unbiased_where_the_unpaired_estimator_reads_below_zero():
    # b_i is a slightly perturbed copy of a_i (a quantized image against the FP image of its
    # seed): both marginals are one distribution, so MMD² = 0. The torchmetrics estimator counts
    # the close (a_i, b_i) pairs in its cross term and reads far below zero; the U-statistic
    # does not, over many draws.
    unpaired, paired = [], []
    for seed in range(20):
        a = _normal(200, 8, seed)
        b = a + 0.05 * _normal(200, 8, 100 + seed)
        unpaired.append(kid_from_features(a, b))
        paired.append(kid_from_features(a, b, paired=True))
    spread = np.std(paired) / np.sqrt(len(paired))
    assert abs(np.mean(paired)) < 3 * spread + 1e-3
    assert np.mean(unpaired) < np.mean(paired) - 10 * spread
    # and a real difference still shows: a shifted paired copy reads clearly positive
    a = _normal(200, 8, 0)
    assert kid_from_features(a, a + 0.5, paired=True) > 0.1


def test_paired_resample_reduces_to_the_paired_estimate_of_the_drawn_rows():
    a, b = _normal(6, 4, 0), _normal(6, 4, 1)
    ones = torch.ones(1, 6, dtype=torch.float64)
    kernels = kernel_matrices(a, b)
    assert bootstrap_mmd(*kernels, ones, paired=True).item() == pytest.approx(
        kid_from_features(a, b, paired=True), rel=1e-9)
    counts = torch.tensor([[2.0, 2, 2, 0, 0, 0]], dtype=torch.float64)
    assert bootstrap_mmd(*kernels, counts, paired=True).item() == pytest.approx(
        kid_from_features(a[:3], b[:3], paired=True), rel=1e-9)
    with pytest.raises(ValueError, match="same counts"):
        bootstrap_mmd(*kernels, ones, ones.clone(), paired=True)
