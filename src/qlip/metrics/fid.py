"""Fréchet Inception Distance (Heusel et al. 2017) on any feature extractor's global features.

FID = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), computed in float64 with scipy's `sqrtm`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from qlip.metrics.features import FeatureExtractor, check_images

# Added to both covariances when their product's square root is singular (as pytorch-fid does).
SQRTM_EPS = 1e-6


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean [D] and covariance [D, D] of a feature set, float64."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


def feature_statistics(features: Tensor | np.ndarray) -> GaussianStatistics:
    """Mean and unbiased covariance of features [N, D] (N >= 2)."""
    values = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features)
    values = values.astype(np.float64)
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"features must be [N >= 2, D]; got shape {values.shape}")
    return GaussianStatistics(values.mean(axis=0), np.cov(values, rowvar=False), len(values))


def frechet_distance(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """Fréchet distance between the Gaussians N(a.mean, a.covariance) and N(b.mean, b.covariance)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} vs {b.mean.shape}")
    cov_a, cov_b = np.atleast_2d(a.covariance), np.atleast_2d(b.covariance)
    with warnings.catch_warnings():
        # With fewer samples than feature dimensions the covariances are singular; the square
        # root still exists (scipy warns anyway), and a non-finite one is retried with an offset.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov_a)) * SQRTM_EPS
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Round-off can leave a tiny imaginary part; a large one means the statistics are broken.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm has a large imaginary part ({np.abs(covmean.imag).max():.3g}): "
                "the covariances are not valid (too few samples for the feature size?)"
            )
        covmean = covmean.real
    mean_term = float(np.sum((a.mean - b.mean) ** 2))
    return mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def fid_from_features(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D]."""
    return frechet_distance(feature_statistics(features_a), feature_statistics(features_b))


def rebatch(images: Iterable[Tensor] | Tensor, batch_size: int) -> Iterable[Tensor]:
    """Yield batches [<=batch_size, 3, H, W] from a tensor [N, 3, H, W] or an iterable of
    single images [3, H, W] and/or batches [B, 3, H, W]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    pending: list[Tensor] = []
    pending_count = 0
    chunks = images.split(batch_size) if torch.is_tensor(images) else images
    for chunk in chunks:
        chunk = chunk.unsqueeze(0) if chunk.ndim == 3 else chunk
        pending.append(chunk)
        pending_count += len(chunk)
        while pending_count >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending = [joined[batch_size:]]
            pending_count -= batch_size
    if pending_count:
        yield torch.cat(pending)


def extract_features(
    feature_fn: Callable[[Tensor], Tensor], images: Iterable[Tensor] | Tensor, batch_size: int = 64
) -> Tensor:
    """Run `feature_fn` (e.g. `extractor.global_features`) over images in batches -> [N, D]."""
    outputs = []
    for batch in rebatch(images, batch_size):
        check_images(batch)
        with torch.no_grad():
            outputs.append(feature_fn(batch).detach().double().cpu())
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs)


def distance_from_images(
    feature_fn: Callable[[Tensor], Tensor],
    real_images: Iterable[Tensor] | Tensor,
    generated_images: Iterable[Tensor] | Tensor,
    batch_size: int = 64,
) -> float:
    """Fréchet distance between two image sets on the features ``feature_fn`` extracts."""
    real = extract_features(feature_fn, real_images, batch_size)
    generated = extract_features(feature_fn, generated_images, batch_size)
    return fid_from_features(real, generated)


def fid_from_images(
    extractor: FeatureExtractor,
    real_images: Iterable[Tensor] | Tensor,
    generated_images: Iterable[Tensor] | Tensor,
    batch_size: int = 64,
) -> float:
    """FID between two image sets, on `extractor.global_features`.

    Example:
        >>> fid_from_images(load_evaluator(), real, generated)  # tensors [N, 3, H, W] in [0, 1]
    """
    return distance_from_images(extractor.global_features, real_images, generated_images, batch_size)
