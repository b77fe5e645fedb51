"""GIQA (Gu et al., ECCV 2020): the quality of one generated image, judged by how typical its
features are of real images. Raw scores only mean something as ranks; `rank_normalize` maps
them to [0, 1] (percentile among reference scores), the target QLIP's T2Q trains on.

- GMM-GIQA: log-likelihood under a Gaussian mixture (K = 5, full covariances) fitted on real
  features, optionally after a PCA keeping 95% of the variance.
- KNN-GIQA: Σ_{k ≤ K} 1 / ‖f − f_k‖₁ over the K nearest real features (K = 1).

Fitted models are saved as safetensors (arrays + JSON metadata); loading never unpickles.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

from ..files import CorruptFileError, check_format, load_tensors, save_tensors

FORMAT_VERSION = 1
# Keeps 1/d finite when a generated feature equals a real one exactly.
KNN_MIN_DISTANCE = 1e-12


def _as_array(features: Tensor | np.ndarray) -> np.ndarray:
    values = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if values.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {values.shape}")
    return values.astype(np.float64)


REMEDY = "fit the GIQA model again on the real features and save it"


def _read(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays, header = load_tensors(path, REMEDY, framework="numpy")
    try:
        metadata = json.loads(header["giqa"])
        if not isinstance(metadata, dict):
            raise TypeError(type(metadata).__name__)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is not a qlip GIQA model (no readable 'giqa' header: "
                               f"{err}); {REMEDY}") from err
    if metadata.get("kind") != kind:
        raise CorruptFileError(f"{path} holds a {metadata.get('kind')} model; expected {kind}; "
                               f"{REMEDY}")
    check_format(metadata | {"format": "giqa"}, path, "giqa", FORMAT_VERSION, REMEDY)
    return arrays, metadata


GMM_COMPONENTS = 5  # GMM-GIQA's mixture size (the GIQA paper's code): its fit needs as many reals


class GMMGIQA:
    """GMM-GIQA. Example:
    >>> giqa = GMMGIQA().fit(real_features)       # [N, D]
    >>> quality = giqa.score(generated_features)  # [M] log-likelihoods, higher is better
    """

    def __init__(self, n_components: int = GMM_COMPONENTS, pca_variance: float | None = 0.95,
                 seed: int = 0):
        if pca_variance is not None and not 0 < pca_variance <= 1:
            raise ValueError(f"pca_variance must be in (0, 1] or None; got {pca_variance}")
        self.n_components, self.pca_variance, self.seed = n_components, pca_variance, seed
        self.pca: PCA | None = None
        self.mixture: GaussianMixture | None = None

    def fit(self, real_features: Tensor | np.ndarray) -> GMMGIQA:
        """Fit the optional PCA and the mixture on real features [N, D]."""
        values = _as_array(real_features)
        if len(values) < self.n_components:
            raise ValueError(f"GMM-GIQA fits {self.n_components} mixture components to the real "
                             f"features: it needs at least {self.n_components} real images; got "
                             f"{len(values)}")
        if self.pca_variance is not None:
            self.pca = PCA(n_components=self.pca_variance, svd_solver="full").fit(values)
            # Same memory layout as after loading, so saved and live models score bit-identically.
            self.pca.components_ = np.ascontiguousarray(self.pca.components_)
            values = self.pca.transform(values)
        self.mixture = GaussianMixture(
            n_components=self.n_components, covariance_type="full", random_state=self.seed
        ).fit(values)
        return self

    def score(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Per-sample log-likelihood [M] of features [M, D]."""
        if self.mixture is None:
            raise RuntimeError(
                "GMMGIQA is not fitted: call fit(real_features) or GMMGIQA.load(path)"
            )
        values = _as_array(features)
        if self.pca is not None:
            values = self.pca.transform(values)
        return self.mixture.score_samples(values)

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to a safetensors file."""
        if self.mixture is None:
            raise RuntimeError("nothing to save: GMMGIQA is not fitted")
        arrays = {
            "weights": self.mixture.weights_,
            "means": self.mixture.means_,
            "covariances": self.mixture.covariances_,
            "precisions_cholesky": self.mixture.precisions_cholesky_,
        }
        if self.pca is not None:
            arrays |= {
                "pca_mean": self.pca.mean_,
                "pca_components": self.pca.components_,
                "pca_explained_variance": self.pca.explained_variance_,
            }
        metadata = {
            "kind": "gmm",
            "version": FORMAT_VERSION,
            "n_components": self.n_components,
            "pca_variance": self.pca_variance,
            "seed": self.seed,
        }
        save_tensors({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path,
                     metadata={"giqa": json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> GMMGIQA:
        """Rebuild a fitted GMMGIQA from `save`'s file."""
        arrays, metadata = _read(path, "gmm")
        giqa = cls(metadata["n_components"], metadata["pca_variance"], metadata["seed"])
        if "pca_mean" in arrays:
            giqa.pca = _restore_pca(arrays)
        mixture = GaussianMixture(n_components=giqa.n_components, covariance_type="full")
        mixture.weights_, mixture.means_ = arrays["weights"], arrays["means"]
        mixture.covariances_ = arrays["covariances"]
        mixture.precisions_cholesky_ = arrays["precisions_cholesky"]
        mixture.n_features_in_ = arrays["means"].shape[1]
        mixture.converged_, mixture.n_iter_, mixture.lower_bound_ = True, 0, 0.0
        giqa.mixture = mixture
        return giqa


def _restore_pca(arrays: dict[str, np.ndarray]) -> PCA:
    components = arrays["pca_components"]
    pca = PCA(n_components=len(components))
    pca.mean_, pca.components_ = arrays["pca_mean"], components
    pca.explained_variance_ = arrays["pca_explained_variance"]
    pca.n_components_, pca.n_features_in_ = len(components), components.shape[1]
    return pca


class KNNGIQA:
    """KNN-GIQA. Example:
    >>> giqa = KNNGIQA(k=1).fit(real_features)   # [N, D]
    >>> quality = giqa.score(generated_features)  # [M], higher is better
    """

    def __init__(self, k: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.k = k
        self.neighbors: NearestNeighbors | None = None
        self.real_features: np.ndarray | None = None

    def fit(self, real_features: Tensor | np.ndarray) -> KNNGIQA:
        """Index the real features [N, D] (N >= k) under the L1 distance."""
        values = _as_array(real_features)
        if len(values) < self.k:
            raise ValueError(f"need at least k={self.k} real features; got {len(values)}")
        self.neighbors = NearestNeighbors(n_neighbors=self.k, metric="manhattan").fit(values)
        self.real_features = values
        return self

    def score(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Σ_{k ≤ K} 1/‖f − f_k‖₁ per sample [M]."""
        if self.neighbors is None:
            raise RuntimeError(
                "KNNGIQA is not fitted: call fit(real_features) or KNNGIQA.load(path)"
            )
        distances, _ = self.neighbors.kneighbors(_as_array(features))  # [M, K]
        return (1.0 / np.maximum(distances, KNN_MIN_DISTANCE)).sum(axis=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the real features and K to a safetensors file."""
        if self.neighbors is None:
            raise RuntimeError("nothing to save: KNNGIQA is not fitted")
        metadata = {"kind": "knn", "version": FORMAT_VERSION, "k": self.k}
        save_tensors({"real_features": np.ascontiguousarray(self.real_features)}, path,
                     metadata={"giqa": json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> KNNGIQA:
        """Rebuild a fitted KNNGIQA from `save`'s file."""
        arrays, metadata = _read(path, "knn")
        return cls(metadata["k"]).fit(arrays["real_features"])


def rank_normalize(
    scores: np.ndarray | Tensor, reference_scores: np.ndarray | Tensor
) -> np.ndarray:
    """Percentile of each score among the reference scores: fraction of references <= score,
    in [0, 1]. Monotone in the score, so rankings are kept.

    Example:
        >>> rank_normalize([0.5, 3.0], [1.0, 2.0, 3.0, 4.0])
        array([0.  , 0.75])
    """
    reference = np.sort(np.asarray(reference_scores, dtype=np.float64).ravel())
    if len(reference) == 0:
        raise ValueError("reference_scores is empty")
    values = np.asarray(scores, dtype=np.float64)
    return np.searchsorted(reference, values, side="right") / len(reference)
