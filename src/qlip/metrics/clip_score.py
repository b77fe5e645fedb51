"""CLIP score: mean image–text cosine similarity from an `ImageTextScorer`.

Returned on the raw cosine scale (≈0.30 for a good SD image with ViT-L/14), as the QLIP paper
reports it. torchmetrics' `CLIPScore` reports `100 · max(cos, 0)`; `to_torchmetrics_scale`
converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qlip.metrics.features import ImageTextScorer
from qlip.metrics.fid import rebatch


@dataclass(frozen=True)
class ClipScoreResult:
    """Per-image cosines [N] (float64) and their mean."""

    per_image: Tensor
    mean: float


def clip_score(
    scorer: ImageTextScorer, images: Tensor, texts: Sequence[str], batch_size: int = 64
) -> ClipScoreResult:
    """Mean cosine between each image [N, 3, H, W] in [0, 1] and its caption.

    Example:
        >>> clip_score(load_evaluator(), images, [p.text for p in prompts]).mean
    """
    if len(texts) != len(images):
        raise ValueError(f"need one text per image; got {len(texts)} texts, {len(images)} images")
    cosines, start = [], 0
    for batch in rebatch(images, batch_size):
        with torch.no_grad():
            batch_texts = list(texts[start : start + len(batch)])
            cosines.append(scorer.image_text_similarity(batch, batch_texts).double().cpu())
        start += len(batch)
    per_image = torch.cat(cosines)
    return ClipScoreResult(per_image=per_image, mean=float(per_image.mean()))


def to_torchmetrics_scale(cosine: float | Tensor) -> float | Tensor:
    """Cosine -> torchmetrics' CLIPScore convention, 100 · max(cos, 0)."""
    if torch.is_tensor(cosine):
        return 100 * cosine.clamp(min=0)
    return 100 * max(float(cosine), 0.0)
