"""Spatial FID (sFID, Nash et al. 2021): FID on an extractor's flattened spatial feature map,
which is sensitive to spatial structure that pooled global features average away."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from qlip.metrics.features import FeatureExtractor
from qlip.metrics.fid import distance_from_images, fid_from_features


def sfid_from_images(
    extractor: FeatureExtractor,
    real_images: Iterable[Tensor] | Tensor,
    generated_images: Iterable[Tensor] | Tensor,
    batch_size: int = 64,
) -> float:
    """sFID between two image sets, on `extractor.spatial_features`.

    Example:
        >>> sfid_from_images(load_evaluator(), real, generated)  # tensors [N, 3, H, W] in [0, 1]
    """
    return distance_from_images(
        extractor.spatial_features, real_images, generated_images, batch_size
    )


# sFID from precomputed spatial features is the same Fréchet distance.
sfid_from_features = fid_from_features
