"""What QLIP's labels are measured with: an image feature extractor, real images' features (for
GIQA and the realism score) and an image–text scorer (the CLIP-score analogue).

- The reference world (``--model reference``): its evaluator's global features and image–text
  cosines; the real images are renders of the training prompts' own scenes (as `qlip eval`'s real
  images are renders of the evaluated prompts' scenes).
- A user's model: Inception pool3 features (torch-fidelity weights) of a folder of real images
  (``--real DIR``) and, for the image–text label, a local CLIP model (``--clip DIR``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..evaluation.measures import IMAGE_SUFFIXES, load_image_folder
from ..metrics import ImageTextScorer, clip_score, extract_features, image_complexity

REAL_RENDER_SEED = 1  # the renders' jitter (qlip eval's real images use the same seed)
# what a T2Q data chunk keeps of each FP image (part of its cache's fingerprint)
MEASURED = ("features", "image_text", "complexity")


@dataclass
class LabelSource:
    """``features``: images → [n, D]; ``scorer``: an ``ImageTextScorer`` (cosines) or None;
    ``real_keys`` name the real images, ``real_chunk(start, stop)`` gives their features."""

    name: str  # what decides the measurements, for the caches' fingerprints
    features: Callable[[torch.Tensor], torch.Tensor] | None  # None: the images' complexity only
    scorer: ImageTextScorer | None
    real_keys: list[str]
    real_chunk: Callable[[int, int], torch.Tensor]

    def measure(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What a T2Q data chunk keeps of its FP images."""
        out = {"complexity": image_complexity(images.float()).cpu()}
        if self.features is not None:
            out["features"] = extract_features(self.features, images).float()
        if self.scorer is not None:
            out["image_text"] = clip_score(self.scorer, images, prompts).per_image.float()
        return out


def reference_source(world_prompts: Sequence, image_size: int, device: str) -> LabelSource:
    """The reference world's evaluator; real features from renders of ``world_prompts``' scenes."""
    from ..world.domain import render_batch
    from ..world.evaluator import load_evaluator

    evaluator = load_evaluator(device)
    scenes = [p.scene for p in world_prompts]

    def real_chunk(start: int, stop: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(REAL_RENDER_SEED * 1_000_003 + start)
        renders = render_batch(scenes[start:stop], image_size, device, generator)
        return extract_features(evaluator.global_features, renders).float()

    keys = [f"{i}\t{p.text}\t{p.scene}" for i, p in enumerate(world_prompts)]
    return LabelSource(f"reference-evaluator/renders-{image_size}", evaluator.global_features,
                       evaluator, keys, real_chunk)


def complexity_source() -> LabelSource:
    """Only the FP images' complexity (the complexity label on a user's model needs no real
    images and no feature network)."""

    def no_real(start: int, stop: int) -> torch.Tensor:
        raise ValueError("the complexity label has no real images")

    return LabelSource("complexity", None, None, [], no_real)


def folder_source(real_dir: str | None, inception_weights: str | None, clip_path: str | None,
                  image_size: int, device: str) -> LabelSource:
    """Inception features of the images in ``real_dir`` (resized to ``image_size``), and a local
    CLIP model's cosines when ``clip_path`` is given."""
    if real_dir is None or not Path(real_dir).is_dir():
        raise FileNotFoundError(f"--real DIR is needed for a model other than the reference "
                                f"model (a folder of real images); got {real_dir!r}")
    from ..metrics import HFCLIPScorer, InceptionExtractor

    extractor = InceptionExtractor(inception_weights, device=device)
    scorer = HFCLIPScorer(clip_path, device=device) if clip_path else None
    files = sorted(p.name for p in Path(real_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def real_chunk(start: int, stop: int) -> torch.Tensor:
        images = load_image_folder(real_dir, image_size, files[start:stop])
        return extract_features(extractor.global_features, images).float()

    return LabelSource(f"inception/{Path(real_dir).resolve()}/{image_size}",
                       extractor.global_features, scorer, files, real_chunk)
