"""A quick pixel-level checker of generated images, used to watch alignment while training.

It is not the project's evaluator (``qlip.world.evaluator``, a learned model): it reads flat
shapes directly. Background = nearest background colour of the border pixels; objects =
connected components of pixels far from the background; per object its colour (nearest palette
colour of its core), shape (best overlap with each shape template of the same area and
centroid), size (equivalent radius) and position slot (nearest slot centre).

Example:
    >>> found = detect_scene(image)  # image: uint8 [64, 64, 3]
    >>> score = prompt_alignment(prompt, found)  # the project's alignment metric
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from qlip.metrics.alignment import PredictedObject, PredictedScene, align_prompt
from qlip.world.domain import (
    BACKGROUNDS,
    COLORS,
    POSITION_CENTERS,
    SHAPES,
    SIZE_RADII,
    Prompt,
)
from qlip.world.render import rasterize, shape_inside

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as an object
MIN_COMPONENT_PIXELS = 20  # a small object covers about 80 pixels at 64x64


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], float) - rgb, axis=1)
    return names[int(distances.argmin())]


@lru_cache(maxsize=1)
def _unit_templates() -> dict[str, tuple[float, float]]:
    """Per shape: area and vertical centroid offset of the shape at radius 1."""
    coords = torch.linspace(-2, 2, 801)
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    cell = float(coords[1] - coords[0]) ** 2
    templates = {}
    for shape in SHAPES:
        inside = shape_inside(shape, u, v).float()
        area = float(inside.sum()) * cell
        templates[shape] = (area, float((inside * v).sum() / inside.sum()))
    return templates


def _classify_shape(alpha: np.ndarray, area: float, centroid: np.ndarray) -> tuple[str, float]:
    """Best-overlapping shape template and its radius (image units) for one object's alpha map."""
    size = alpha.shape[0]
    templates = _unit_templates()
    radii = {s: np.sqrt(area / templates[s][0]) for s in SHAPES}  # area in image units^2
    centers = torch.tensor(
        [[centroid[0], centroid[1] - templates[s][1] * radii[s]] for s in SHAPES]
    ).float()
    candidates = rasterize(
        torch.arange(len(SHAPES))[:, None], centers[:, None], torch.tensor([radii[s] for s in
        SHAPES]).float()[:, None], torch.ones(len(SHAPES), 1, 3), torch.ones(len(SHAPES), 1,
        dtype=torch.bool), torch.zeros(len(SHAPES), 3), SHAPES, size, 2,
    )[:, 0].numpy()  # candidates: [S, H, W] coverage
    overlap = np.minimum(candidates, alpha).sum((1, 2)) / np.maximum(candidates, alpha).sum((1, 2))
    best = SHAPES[int(overlap.argmax())]
    return best, float(radii[best])


def detect_scene(image: np.ndarray) -> PredictedScene:
    """Read background and objects from a uint8 [H, W, 3] image of the reference world."""
    pixels = image.astype(np.float64)
    size = image.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest(BACKGROUNDS, np.median(border, axis=0))
    background_rgb = np.array(BACKGROUNDS[background], float)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    labels, count = ndimage.label(distance > FOREGROUND_DISTANCE, structure=np.ones((3, 3)))
    by_slot: dict[str, tuple[int, PredictedObject]] = {}
    for index in range(1, count + 1):
        component = labels == index
        area = int(component.sum())
        if area < MIN_COMPONENT_PIXELS:
            continue
        found = _read_object(pixels, component, background_rgb, size)
        # One object per slot, as in the domain: the largest component speaks for its slot.
        if found is not None and area > by_slot.get(found.position, (0, None))[0]:
            by_slot[found.position] = (area, found)
    return PredictedScene(tuple(found for _, found in by_slot.values()), background)


def _read_object(pixels, component, background_rgb, size) -> PredictedObject | None:
    core = ndimage.binary_erosion(component)
    core = core if core.sum() >= 3 else component
    color = _nearest(COLORS, np.median(pixels[core], axis=0))
    direction = np.array(COLORS[color], float) - background_rgb
    # Coverage of each pixel by the object: projection of its colour on the bg->object line.
    alpha = ((pixels - background_rgb) @ direction) / (direction @ direction)
    alpha = np.clip(alpha, 0, 1) * ndimage.binary_dilation(component)
    if alpha.sum() < MIN_COMPONENT_PIXELS / 2:  # far from the background, but not towards
        return None  # any palette colour: not an object of this world
    area = alpha.sum() / size**2
    rows, cols = np.indices(alpha.shape)
    centroid = np.array([(alpha * (cols + 0.5)).sum(), (alpha * (rows + 0.5)).sum()])
    centroid = centroid / alpha.sum() / size
    shape, radius = _classify_shape(alpha, area, centroid)
    size_name = "small" if radius < (SIZE_RADII["small"] + SIZE_RADII["large"]) / 2 else "large"
    slots = list(POSITION_CENTERS)
    slot_xy = np.array([POSITION_CENTERS[s] for s in slots])
    # Objects' boxes are centred on their slot; the centroid of a triangle or star is not.
    _, offset = _unit_templates()[shape]
    box_center = centroid - np.array([0.0, offset * radius])
    position = slots[int(np.linalg.norm(slot_xy - box_center, axis=1).argmin())]
    return PredictedObject(shape, color, size_name, position)


def prompt_alignment(prompt: Prompt, found: PredictedScene) -> float:
    """The project's alignment (``qlip.metrics.alignment``) of the checker's reading of an image:
    fraction of stated attributes found; a mention whose stated slot is wrong finds nothing."""
    return align_prompt(prompt.mentions, prompt.background, found).score


def alignment_report(prompts: list[Prompt], images: np.ndarray) -> dict[str, float]:
    """Mean alignment overall, on single-object prompts, per richness level.

    ``images``: uint8 [N, H, W, 3], one per prompt.
    """
    scores = np.array([prompt_alignment(p, detect_scene(im)) for p, im in zip(prompts, images)])
    single = np.array([len(p.mentions) == 1 and len(p.scene.objects) == 1 for p in prompts])
    report = {"overall": float(scores.mean()), "count": len(prompts)}
    if single.any():
        report["single_object"] = float(scores[single].mean())
    for level in sorted({p.richness for p in prompts}):
        chosen = np.array([p.richness == level for p in prompts])
        report[f"richness_{level}"] = float(scores[chosen].mean())
    return report
