"""Image complexity: the mean gradient magnitude of an image's luminance (the criterion of QLIP's
Table S3, which a T2C network predicts from the text).

Finite differences between neighbouring pixels, on images in [0, 1]; an image of one colour
scores 0, one full of edges up to √2. Written by hand: a two-line difference of tensors.
"""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def image_complexity(images: torch.Tensor) -> torch.Tensor:
    """``[B]``: each image's mean ‖∇Y‖ over its pixels, Y the luminance of ``images``
    ``[B, 3, H, W]`` in [0, 1] (forward differences on the ``[H−1, W−1]`` grid both share).

    >>> float(image_complexity(torch.zeros(1, 3, 8, 8)))
    0.0
    """
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 2:
        raise ValueError(f"image_complexity needs images [B, 3, H, W] with H, W >= 2; got "
                         f"{tuple(images.shape)}")
    luma = torch.tensordot(torch.tensor(LUMA, dtype=images.dtype, device=images.device),
                           images, dims=([0], [1]))  # [B, H, W]
    gx = luma[:, :-1, 1:] - luma[:, :-1, :-1]
    gy = luma[:, 1:, :-1] - luma[:, :-1, :-1]
    return torch.sqrt(gx.square() + gy.square()).mean(dim=(1, 2))
