"""Does a feature space see quantization damage? Degrade renders at a few strengths and measure
the Fréchet distance between the clean and the degraded set in that space.

Degradations (each at increasing strengths; images [N, 3, H, W] in [0, 1]):

- ``noise``: additive Gaussian pixel noise of std σ;
- ``blur``: Gaussian blur of std σ pixels;
- ``color``: every pixel moved by +s on red and −s on blue (a colour cast);
- ``posterize``: each channel rounded to L levels (banding);
- ``vae``: the model's own artifacts: ``x + a·(vae(x) − x)`` with ``vae`` a caller-given
  ``reconstruct`` function (the reference VAE: its edge streak near the right border and its
  smoothing), a = 0.25 … 2 (2 exaggerates the artifact; repeated passes were tried first, but
  the VAE is nearly idempotent after one).

Example:
    >>> table = sensitivity(evaluator_spaces, renders)          # {space: {kind: [FID...]}}
    >>> is_monotone(table["fidelity"]["noise"])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics.bootstrap import frechet_by_eigenvalues

STRENGTHS: dict[str, tuple[float, ...]] = {
    "noise": (0.02, 0.05, 0.1, 0.2),
    "blur": (0.5, 1.0, 1.5, 2.0),
    "color": (0.02, 0.05, 0.1, 0.2),
    "posterize": (32, 16, 8, 4),
    "vae": (0.25, 0.5, 1.0, 2.0),
}


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.device)
    channels = images.shape[1]
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def degrade(images: Tensor, kind: str, strength: float, seed: int = 0,
            reconstruct: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``images`` degraded by ``kind`` at ``strength`` (see the module doc), clamped to [0, 1]."""
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator).to(images)
        out = images + strength * noise
    elif kind == "blur":
        out = _gaussian_blur(images, strength)
    elif kind == "color":
        shift = torch.tensor([strength, 0.0, -strength], dtype=images.dtype).view(1, 3, 1, 1)
        out = images + shift.to(images.device)
    elif kind == "posterize":
        levels = int(strength) - 1
        out = torch.round(images * levels) / levels
    elif kind == "vae":
        if reconstruct is None:
            raise ValueError("kind 'vae' needs reconstruct=fn (images -> VAE reconstructions)")
        out = images + strength * (reconstruct(images) - images)
    else:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {sorted(STRENGTHS)}")
    return out.clamp(0, 1)


def sensitivity(
    spaces: dict[str, Callable[[Tensor], Tensor]], images: Tensor,
    strengths: dict[str, tuple[float, ...]] | None = None,
    reconstruct: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """FID between ``images`` and their degraded copies, per feature space and degradation, at
    every strength: ``{space: {kind: [fid per strength]}}``."""
    strengths = strengths or {k: v for k, v in STRENGTHS.items()
                              if k != "vae" or reconstruct is not None}
    clean = {name: fn(images).double() for name, fn in spaces.items()}
    if reconstruct is not None:  # one VAE pass serves every strength
        reconstruction = reconstruct(images)
        reconstruct = lambda _: reconstruction  # noqa: E731
    table: dict[str, dict[str, list[float]]] = {name: {} for name in spaces}
    for kind, values in strengths.items():
        for strength in values:
            degraded = degrade(images, kind, strength, reconstruct=reconstruct)
            for name, fn in spaces.items():
                fid = frechet_by_eigenvalues(clean[name], fn(degraded).double())
                table[name].setdefault(kind, []).append(fid)
    return table


def is_monotone(values: list[float], tolerance: float = 0.0) -> bool:
    """Strictly increasing up to ``tolerance`` (relative to the largest value)."""
    slack = tolerance * max(abs(v) for v in values)
    return all(b > a - slack for a, b in zip(values, values[1:])) and values[-1] > values[0]
