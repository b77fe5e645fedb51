"""GIQA: in-distribution points rank above outliers; save/load is exact; rank normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from qlip.metrics import GMMGIQA, KNNGIQA, rank_normalize


@pytest.fixture(scope="module")
def clusters():
    """Real features: three clusters in 6-D (with one redundant direction for PCA to drop)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5, size=(3, 5))
    real = np.concatenate([c + rng.normal(size=(200, 5)) for c in centres])
    inliers = np.concatenate([c + rng.normal(size=(10, 5)) for c in centres])
    outliers = rng.normal(scale=5, size=(30, 5)) + 25

    def lift(x):  # 6th feature = copy of the first: zero variance left after PCA drops it
        return np.concatenate([x, x[:, :1]], axis=1)

    return lift(real), lift(inliers), lift(outliers)


@pytest.mark.parametrize(
    "giqa",
    [GMMGIQA(n_components=3), GMMGIQA(pca_variance=None), KNNGIQA(k=1), KNNGIQA(k=3)],
    ids=["gmm-pca", "gmm", "knn1", "knn3"],
)
def test_inliers_score_above_outliers(clusters, giqa):
    real, inliers, outliers = clusters
    giqa.fit(real)
    assert giqa.score(inliers).min() > giqa.score(outliers).max()


def test_pca_keeps_95_percent_of_variance(clusters):
    giqa = GMMGIQA(n_components=3).fit(clusters[0])
    assert giqa.pca.n_components_ < 6
    assert giqa.pca.explained_variance_ratio_.sum() >= 0.95


@pytest.mark.parametrize(
    "make",
    [lambda: GMMGIQA(n_components=3), lambda: GMMGIQA(pca_variance=None), lambda: KNNGIQA(k=2)],
    ids=["gmm-pca", "gmm", "knn"],
)
def test_save_load_round_trip_gives_identical_scores(clusters, tmp_path, make):
    real, inliers, outliers = clusters
    giqa = make().fit(real)
    giqa.save(tmp_path / "giqa.safetensors")
    loaded = type(giqa).load(tmp_path / "giqa.safetensors")
    probe = np.concatenate([inliers, outliers])
    np.testing.assert_array_equal(loaded.score(probe), giqa.score(probe))


def test_loading_the_wrong_kind_says_so(clusters, tmp_path):
    KNNGIQA().fit(clusters[0]).save(tmp_path / "knn.safetensors")
    with pytest.raises(ValueError, match="holds a knn model"):
        GMMGIQA.load(tmp_path / "knn.safetensors")


def test_knn_score_is_inverse_l1_distance():
    giqa = KNNGIQA(k=2).fit(np.array([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]]))
    # nearest to (0, 1): (0, 0) at L1 1 and (1, 1) at L1 1 -> 1/1 + 1/1
    assert giqa.score(np.array([[0.0, 1.0]]))[0] == pytest.approx(2.0)


def test_unfitted_model_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        GMMGIQA().score(np.zeros((2, 3)))


def test_rank_normalize_is_the_percentile_among_references():
    reference = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(
        rank_normalize([0.5, 2.0, 3.5, 9.0], reference), [0.0, 0.5, 0.75, 1.0]
    )
    # Monotone: ranks of raw GMM log-likelihoods survive normalisation.
    scores = np.array([-1e6, -3.0, 7.0])
    assert np.all(np.diff(rank_normalize(scores, np.linspace(-10, 10, 101))) >= 0)
    with pytest.raises(ValueError, match="empty"):
        rank_normalize([1.0], [])
