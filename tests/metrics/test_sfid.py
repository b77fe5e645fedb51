"""sFID: Fréchet distance on spatial features, which sees layout that mean features miss."""

from __future__ import annotations

import pytest
import torch

from qlip.metrics import fid_from_features, fid_from_images, sfid_from_images
from tests.metrics.fakes import MeanColourExtractor


def _bright_square_images(count: int, left: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 8, 8, generator=g) * 0.1
    columns = slice(0, 4) if left else slice(4, 8)
    images[:, :, 2:6, columns] += 0.8
    return images


def test_identical_sets_have_zero_sfid():
    images = _bright_square_images(60, left=True, seed=0)
    assert abs(sfid_from_images(MeanColourExtractor(), images, images)) < 1e-6


def test_sfid_sees_layout_that_global_features_average_away():
    extractor = MeanColourExtractor()
    left = _bright_square_images(60, left=True, seed=1)
    right = _bright_square_images(60, left=False, seed=2)
    global_fid = fid_from_images(extractor, left, right)
    spatial_fid = sfid_from_images(extractor, left, right)
    # Moving the square keeps the mean colour: global FID stays at sampling noise.
    assert global_fid < 0.01
    assert spatial_fid > 100 * global_fid
    direct = fid_from_features(extractor.spatial_features(left), extractor.spatial_features(right))
    assert spatial_fid == pytest.approx(direct, rel=1e-6)
