"""CLIP score on a fake scorer: batching, per-image values, scale conversion."""

from __future__ import annotations

import pytest
import torch

from qlip.metrics import clip_score, to_torchmetrics_scale
from tests.metrics.fakes import RednessScorer


def test_clip_score_pairs_each_image_with_its_text_across_batches():
    images = torch.zeros(5, 3, 4, 4)
    images[:, 0] = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])[:, None, None]
    texts = ["a red circle", "a square", "red", "a star", "a red star"]
    scorer = RednessScorer()
    result = clip_score(scorer, images, texts, batch_size=2)
    expected = torch.tensor([0.2, 0.1, 0.6, 0.1, 1.0], dtype=torch.float64)
    torch.testing.assert_close(result.per_image, expected)
    assert result.mean == pytest.approx(2.0 / 5)
    assert scorer.batch_sizes == [2, 2, 1]


def test_clip_score_needs_one_text_per_image():
    with pytest.raises(ValueError, match="one text per image"):
        clip_score(RednessScorer(), torch.zeros(2, 3, 4, 4), ["a red circle"])


def test_torchmetrics_scale_is_100_times_clamped_cosine():
    assert to_torchmetrics_scale(0.31) == pytest.approx(31.0)
    assert to_torchmetrics_scale(-0.2) == 0.0
    torch.testing.assert_close(
        to_torchmetrics_scale(torch.tensor([0.25, -0.1])), torch.tensor([25.0, 0.0])
    )
