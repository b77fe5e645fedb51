"""Fidelity to a reference run's images of the same prompts and seeds (as MixDQ, ViDiT-Q and
SVDQuant report quantization damage): paired PSNR and a perceptual distance per image.

The perceptual distance is LPIPS' recipe without its learned layer weights ("lin" off): at each
of several feature maps, unit-normalise every position's channel vector, take the squared
difference, average over positions; average over maps. ``StageMapDistance`` takes any function
that returns the maps (the reference world: the evaluator's conv stages). On a user's machine
``LPIPSDistance`` runs torchmetrics' LPIPS with backbone weights the user supplies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qlip.metrics.features import check_images

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; capped so that means stay finite
TORCHVISION_ALEXNET = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def _check_pair(a: Tensor, b: Tensor) -> None:
    check_images(a)
    check_images(b)
    if a.shape != b.shape:
        raise ValueError(f"paired images must have the same shape; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)} (are both runs of the same prompts and size?)")


def psnr(a: Tensor, b: Tensor) -> np.ndarray:
    """Per-image PSNR in dB [N] of images [N, 3, H, W] in [0, 1], capped at 100 dB.

    Example:
        >>> psnr(generated, fp_images).mean()
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=10 ** (-PSNR_CAP_DB / 10)))).numpy()


def _normalised(feature_map: Tensor) -> Tensor:
    return feature_map / (feature_map.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class StageMapDistance:
    """Perceptual distance on the maps ``maps_fn(images) -> [map [N, C, H, W], ...]``.

    Example:
        >>> StageMapDistance(lambda x: evaluator_stage_maps(evaluator, x)).distance(a, b)  # [N]
    """

    def __init__(self, maps_fn: Callable[[Tensor], list[Tensor]], batch_size: int = 128):
        self.maps_fn = maps_fn
        self.batch_size = batch_size

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> np.ndarray:
        _check_pair(a, b)
        out = []
        for start in range(0, len(a), self.batch_size):
            maps_a = self.maps_fn(a[start : start + self.batch_size])
            maps_b = self.maps_fn(b[start : start + self.batch_size])
            per_map = [(_normalised(x) - _normalised(y)).pow(2).sum(1).mean((1, 2))
                       for x, y in zip(maps_a, maps_b)]
            out.append(torch.stack(per_map).mean(0).double().cpu())
        return torch.cat(out).numpy()


class LPIPSDistance:
    """torchmetrics' LPIPS (AlexNet backbone, its shipped linear layers) with the torchvision
    AlexNet weights read from ``backbone_weights``: nothing is downloaded.

    Example:
        >>> LPIPSDistance("/models/alexnet-owt-7be5be79.pth").distance(a, b)  # [N]
    """

    def __init__(self, backbone_weights: str | os.PathLike | None, device: str = "cpu"):
        path = Path(backbone_weights) if backbone_weights else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the torchvision AlexNet weights as a local file (got {path}); "
                f"download {TORCHVISION_ALEXNET} on a machine with internet and pass "
                "--lpips-weights PATH. qlip downloads nothing."
            )
        try:
            import torchvision  # noqa: F401  torchmetrics' LPIPS builds its backbone with it
            from torchmetrics.functional.image.lpips import _LPIPS
        except ImportError as error:
            raise ImportError("LPIPS needs torchvision: pip install torchvision") from error
        self.device = torch.device(device)
        # pnet_rand: build the backbone without weights (no download), then load the user's.
        self.net = _LPIPS(pretrained=True, net="alex", pnet_rand=True).to(self.device).eval()
        self._load_backbone(torch.load(path, map_location="cpu", weights_only=True))

    def _load_backbone(self, state: dict) -> None:
        """torchvision's ``features.{i}.*`` keys onto torchmetrics' ``slice{k}.{i}.*``."""
        mapping = {}
        for k in range(1, self.net.net.N_slices + 1):
            for name, _ in getattr(self.net.net, f"slice{k}").named_parameters():
                mapping[f"features.{name}"] = f"slice{k}.{name}"
        missing = [key for key in mapping if key not in state]
        if missing:
            raise ValueError(f"not a torchvision AlexNet state dict: {missing[0]} missing")
        self.net.net.load_state_dict({mapping[k]: state[k] for k in mapping}, strict=True)

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> np.ndarray:
        _check_pair(a, b)
        # LPIPS takes [-1, 1] inputs
        values = self.net(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1)
        return values.flatten().double().cpu().numpy()
