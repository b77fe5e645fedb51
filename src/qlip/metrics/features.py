"""Feature-extractor protocols and adapters for users' real networks (Inception, CLIP).

Every metric in `qlip.metrics` takes an object that follows one of these protocols, never a
hard-wired network: in the reference world the evaluator (`qlip.world.evaluator`) plays both
roles; on a user's machine `InceptionExtractor` and `HFCLIPScorer` do.

Images are always float tensors `[N, 3, H, W]` with values in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
# sFID (Nash et al. 2021) reads the first 7 channels of TF-Inception's `mixed_6/conv`, the 1x1
# branch of the sixth mixed block; in torch-fidelity's port that block is `Mixed_6d`.
SFID_LAYER = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to the features FID, sFID and GIQA compare."""

    def global_features(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] in [0, 1] -> [N, D] (FID, GIQA)."""
        ...

    def spatial_features(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] in [0, 1] -> [N, D'] flattened spatial map (sFID)."""
        ...


@runtime_checkable
class ImageTextScorer(Protocol):
    """Scores how well each image matches its caption (CLIP score)."""

    def image_text_similarity(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """images: [N, 3, H, W] in [0, 1], N texts -> [N] cosine similarities in [-1, 1]."""
        ...


def check_images(images: Tensor) -> None:
    """Raise a ValueError unless `images` is a float [N, 3, H, W] tensor in [0, 1]."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, 3, H, W]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1]; got dtype {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1]; got [{images.min():.3f}, {images.max():.3f}] "
            "(map [-1, 1] outputs with (x + 1) / 2 and clamp)"
        )


def _default_inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionExtractor:
    """torchmetrics' Inception-v3 (torch-fidelity port): pool3 2048-d global features and
    `mixed_6/conv[:7]` flattened (7 x 17 x 17 = 2023-d) spatial features, as FID and sFID use.

    Nothing is downloaded: pass the torch-fidelity weights file, or have it in torch's hub cache.
    ``pip install 'qlip[metrics]'`` brings torch-fidelity. ``network`` replaces the Inception
    network by any module of its shape (uint8 images in, pooled features out, a submodule at
    ``SFID_LAYER``): ``qlip.testing.TinyInception`` tests this path without a download.

    Example:
        >>> extractor = InceptionExtractor("/models/" + INCEPTION_WEIGHTS_FILE, device="cuda")
        >>> feats = extractor.global_features(images)  # [N, 2048]
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str = "cpu",
                 network: torch.nn.Module | None = None):
        self.device = torch.device(device)
        self.network = network if network is not None else self._inception(weights_path)
        self.network = self.network.to(self.device).eval()
        self._captured: Tensor | None = None
        self.network.get_submodule(SFID_LAYER).register_forward_hook(self._capture_spatial)

    @staticmethod
    def _inception(weights_path: str | os.PathLike | None) -> torch.nn.Module:
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as error:  # pragma: no cover - torchmetrics is a dependency
            raise ImportError(
                "InceptionExtractor needs torchmetrics: pip install torchmetrics"
            ) from error
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError(
                "InceptionExtractor needs torch-fidelity: pip install 'qlip[metrics]' (or pip "
                "install torch-fidelity)"
            )
        path = Path(weights_path) if weights_path is not None else _default_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path}. Download {INCEPTION_WEIGHTS_URL} on a "
                "machine with internet and pass its local path (qlip eval --inception-weights "
                "FILE; in Python InceptionExtractor(weights_path=...))"
            )
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(path),
        )

    def _capture_spatial(self, module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        self._captured = output  # output: [N, 192, 17, 17]

    @torch.no_grad()
    def _run(self, images: Tensor) -> Tensor:
        check_images(images)
        # torch-fidelity expects uint8 [0, 255] and resizes to 299 itself.
        as_uint8 = (images * 255).round().to(torch.uint8).to(self.device)
        return self.network(as_uint8).double()

    def global_features(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] in [0, 1] -> [N, 2048] pool3 features."""
        return self._run(images).cpu()

    def spatial_features(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] in [0, 1] -> [N, 2023] sFID features."""
        self._run(images)
        spatial = self._captured[:, :SFID_CHANNELS]  # [N, 7, 17, 17]
        return spatial.flatten(1).double().cpu()


class HFCLIPScorer:
    """A transformers CLIP model loaded from a local folder, as an `ImageTextScorer`.

    Example:
        >>> scorer = HFCLIPScorer("/models/clip-vit-large-patch14", device="cuda")
        >>> cosines = scorer.image_text_similarity(images, ["a red circle"] * len(images))
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no CLIP model at {folder} (config.json missing). Save one there first, e.g. "
                "CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(path) "
                "and the same for CLIPProcessor, on a machine with internet."
            )
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def image_text_similarity(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """images: [N, 3, H, W] in [0, 1], N texts -> [N] cosine similarities."""
        check_images(images)
        if len(texts) != len(images):
            raise ValueError(
                f"need one text per image; got {len(texts)} texts, {len(images)} images"
            )
        inputs = self.processor(
            text=list(texts),
            images=list(images.float()),
            return_tensors="pt",
            padding=True,
            truncation=True,
            do_rescale=False,
        ).to(self.device)
        # CLIPModel's forward returns L2-normalised projections in every transformers version.
        outputs = self.model(**inputs)
        return (outputs.image_embeds * outputs.text_embeds).sum(dim=-1).double().cpu()
