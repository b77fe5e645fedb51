"""What measures generated images: the reference world's evaluator and renders, or a user's real
images with Inception and (optionally) a CLIP model from a local path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..metrics.fidelity import LPIPSDistance, StageMapDistance
from ..metrics.giqa import GMM_COMPONENTS
from .harness import EvalPrompt, Measures

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_SEED, FLOOR_SEED = 1, 2


def _render_all(prompts: Sequence[EvalPrompt], size: int, seed: int, device: str) -> torch.Tensor:
    from ..world.domain import render_batch

    generator = torch.Generator(device).manual_seed(seed)
    scenes = [p.world_prompt.scene for p in prompts]
    chunks = [render_batch(scenes[i : i + 256], size, device, generator).cpu()
              for i in range(0, len(scenes), 256)]
    return torch.cat(chunks)


@torch.no_grad()
def evaluator_stage_maps(evaluator, images: torch.Tensor, count: int | None = None
                         ) -> list[torch.Tensor]:
    """The outputs of the evaluator's first ``count`` (default: all four) conv stages
    [N, C, H, W] (64² to 8²): the maps of the reference world's perceptual distance."""
    x = evaluator.prepare(images) * 2 - 1  # the tower's own input scaling
    maps = []
    for index, stage in enumerate(evaluator.image_tower.stages[:count]):
        x = stage(x if index == 0 else F.avg_pool2d(x, 2))
        maps.append(x)
    return maps


FIDELITY_STAGES = (0, 1)  # the 64² and 32² stages: where pixel-level damage still shows


@torch.no_grad()
def evaluator_fidelity_features(evaluator, images: torch.Tensor) -> torch.Tensor:
    """[N, 192] damage-sensitive features: the mean and the standard deviation over positions
    of every channel of the evaluator's first two conv stages (32 + 64 channels). Global
    features are trained to ignore noise and blur; these early maps are not (measured in
    docs/metrics.md)."""
    maps = evaluator_stage_maps(evaluator, images, max(FIDELITY_STAGES) + 1)
    parts = [torch.cat([maps[i].mean((2, 3)), maps[i].std((2, 3))], 1) for i in FIDELITY_STAGES]
    return torch.cat(parts, 1).float().cpu()


class WorldExtractor:
    """The reference evaluator's global and spatial features plus its fidelity features."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.global_features(images)

    def spatial_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.spatial_features(images)

    def fidelity_features(self, images: torch.Tensor) -> torch.Tensor:
        return evaluator_fidelity_features(self.evaluator, images)


def reference_measures(
    prompts: Sequence[EvalPrompt], floor: Sequence[EvalPrompt], device: str
) -> Callable[[int], Measures]:
    """Real images = renders of the prompts' scenes; renders of other scenes from the same set
    (``floor``) are an independent real set whose FID to the first is the floor; the evaluator is
    extractor, scorer and scene reader."""

    from ..world.evaluator import load_evaluator

    evaluator = load_evaluator(device)  # before generating: a missing evaluator fails fast

    def build(size: int) -> Measures:
        return Measures(
            extractor=WorldExtractor(evaluator), scorer=evaluator, reader=evaluator,
            real_paired=True,
            perceptual=StageMapDistance(lambda x: evaluator_stage_maps(evaluator, x)),
            real_images=_render_all(prompts, size, REAL_SEED, device),
            floor_images=_render_all(floor, size, FLOOR_SEED, device),
            notes=["feature extractor, scorer and alignment: the reference world's evaluator",
                   "perceptual distance: unit-normalised evaluator conv-stage maps (LPIPS "
                   "without learned weights)",
                   "real images: renders of the prompts' scenes"],
        )

    return build


def check_real_set(real_folder: str | Path | None, num_images: int) -> None:
    """Refuse, before any image is generated, a real set too small to measure against: GMM-GIQA
    fits :data:`~qlip.metrics.giqa.GMM_COMPONENTS` mixture components to it. Without
    ``real_folder`` the real set is the reference world's renders, one a prompt
    (``num_images``)."""
    if real_folder is None:
        if num_images < GMM_COMPONENTS:
            raise ValueError(f"--num-images {num_images} renders {num_images} real images; GIQA "
                             f"fits {GMM_COMPONENTS} mixture components to them: pass "
                             f"--num-images {GMM_COMPONENTS} or more")
        return
    folder = Path(real_folder)
    count = len(image_files(folder))
    if count < GMM_COMPONENTS:
        raise ValueError(f"--real {folder} holds {count} images; GIQA fits {GMM_COMPONENTS} "
                         f"mixture components to the real images: give it at least "
                         f"{GMM_COMPONENTS}")


def image_files(folder: Path) -> list[Path]:
    """The image files of the ``--real`` folder ``folder``, sorted."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--real folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: str | Path, size: int, names: Sequence[str] | None = None
                      ) -> torch.Tensor:
    """Every image in ``folder`` (sorted; or the files ``names`` of it), resized to ``size``², as
    float [N, 3, H, W] in [0, 1]."""
    folder = Path(folder)
    if names is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"--real folder not found: {folder}")
        files = [folder / name for name in names]
    else:
        files = image_files(folder)
        if len(files) < 2:
            raise ValueError(f"{folder} holds {len(files)} images; FID needs a set of real images")
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC))
              for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def inception_extractor(weights: str | None, device: str):
    """The Inception features of a user's model (one place, so a test can give a tiny one)."""
    from ..metrics import InceptionExtractor

    return InceptionExtractor(weights, device=device)


def folder_measures(
    real_dir: str | Path | None, inception_weights: str | None, clip_path: str | None, device: str,
    lpips_weights: str | None = None,
) -> Callable[[int], Measures]:
    """For a user's model: real images from ``real_dir``, Inception features (torch-fidelity
    weights), CLIP score from a local CLIP folder if given."""
    if real_dir is None:
        raise ValueError(
            "--real DIR is needed for a model other than the reference model: a folder of real "
            "images (e.g. COCO val images) to compute FID, sFID and GIQA against"
        )

    if not Path(real_dir).is_dir():
        raise FileNotFoundError(f"--real folder not found: {real_dir}")
    from ..metrics import HFCLIPScorer

    # built before generating, so that missing weights fail before any work is done
    extractor = inception_extractor(inception_weights, device)
    scorer = HFCLIPScorer(clip_path, device=device) if clip_path else None
    perceptual = LPIPSDistance(lpips_weights, device) if lpips_weights else None

    def build(size: int) -> Measures:
        notes = ["feature extractor: Inception-v3 (torch-fidelity weights)"]
        if scorer is None:
            notes.append("no CLIP score: pass --clip PATH (a local CLIP model folder)")
        if perceptual is None:
            notes.append("no perceptual distance: pass --lpips-weights PATH (torchvision AlexNet)")
        return Measures(extractor=extractor, scorer=scorer, perceptual=perceptual,
                        real_images=load_image_folder(real_dir, size), notes=notes)

    return build
