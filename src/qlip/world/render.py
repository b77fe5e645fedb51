"""Anti-aliased rasterisation of flat-coloured shapes with torch (CPU or GPU, batched).

Every shape is an inside test on local coordinates ``(u, v)`` in units of the object's radius, so a
whole batch of scenes renders as a few broadcast tensor operations; coverage is anti-aliased by
supersampling each pixel on a regular ``supersample x supersample`` grid and averaging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Star outline: inner vertices at this fraction of the outer radius.
STAR_INNER_RATIO = 0.45
# Shapes are scaled so that their areas are close: a square of half-side 1 or a triangle of
# circumradius 1 would look much bigger or smaller than a circle of radius 1.
SHAPE_SCALE = {"circle": 1.0, "square": 0.86, "triangle": 1.18, "star": 1.25}


def _regular_polygon_inside(u: torch.Tensor, v: torch.Tensor, sides: int, rotation: float):
    """Inside test for a regular polygon of circumradius 1 with a vertex at angle ``rotation``."""
    radius = torch.sqrt(u * u + v * v)
    sector = 2 * math.pi / sides
    angle = torch.remainder(torch.atan2(v, u) - rotation, sector) - sector / 2
    # Distance along the nearest edge normal must not exceed the apothem.
    return radius * torch.cos(angle) <= math.cos(math.pi / sides)


def _star_inside(u: torch.Tensor, v: torch.Tensor, rotation: float) -> torch.Tensor:
    """Inside test for a five-pointed star of outer radius 1 with a tip at angle ``rotation``."""
    radius = torch.sqrt(u * u + v * v)
    sector = 2 * math.pi / 5
    angle = torch.remainder(torch.atan2(v, u) - rotation, sector)
    angle = torch.minimum(angle, sector - angle)  # fold onto [0, pi/5] by symmetry
    px, py = radius * torch.cos(angle), radius * torch.sin(angle)
    # Edge from the tip A = (1, 0) to the inner vertex B; inside = same side as the origin.
    bx = STAR_INNER_RATIO * math.cos(sector / 2)
    by = STAR_INNER_RATIO * math.sin(sector / 2)
    side_point = (bx - 1) * py - by * (px - 1)
    side_origin = (bx - 1) * 0 - by * (0 - 1)
    return side_point * side_origin >= 0


def shape_inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the points ``(u, v)`` (object-local, y pointing down) inside ``shape``."""
    scale = SHAPE_SCALE[shape]
    u, v = u / scale, v / scale
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 1.0
    if shape == "triangle":
        # Pointing up (angle -pi/2 in image coordinates); its bounding box spans v in [-1, 0.5]
        # around the circumcentre, so shift it down by 0.25 to centre the box on the slot.
        return _regular_polygon_inside(u, v - 0.25, 3, -math.pi / 2)
    if shape == "star":
        return _star_inside(u, v, -math.pi / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {tuple(SHAPE_SCALE)}")


def rasterize(
    shape_ids: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
    colors: torch.Tensor,
    present: torch.Tensor,
    background: torch.Tensor,
    shapes: tuple[str, ...],
    size: int = 64,
    supersample: int = 4,
) -> torch.Tensor:
    """Render scenes of up to K objects, drawn in order over a flat background.

    Args:
        shape_ids: [B, K] long, index into ``shapes``.
        centers: [B, K, 2] float, (x, y) in [0, 1] image units.
        radii: [B, K] float, object radius in image units.
        colors: [B, K, 3] float in [0, 1].
        present: [B, K] bool, False for empty object slots.
        background: [B, 3] float in [0, 1].
        shapes: shape names, in the order of ``shape_ids``.
    Returns:
        [B, 3, size, size] float images in [0, 1].
    """
    batch, num_objects = shape_ids.shape
    device = centers.device
    fine = size * supersample
    coords = (torch.arange(fine, device=device, dtype=torch.float32) + 0.5) / fine
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")  # [F, F]
    image = background[:, :, None, None].expand(batch, 3, fine, fine).clone()
    for k in range(num_objects):
        radius = radii[:, k, None, None].clamp_min(1e-6)
        u = (grid_x[None] - centers[:, k, 0, None, None]) / radius  # u: [B, F, F]
        v = (grid_y[None] - centers[:, k, 1, None, None]) / radius
        inside = torch.zeros_like(u, dtype=torch.bool)
        for shape_index, shape in enumerate(shapes):
            is_shape = (shape_ids[:, k] == shape_index) & present[:, k]
            inside |= is_shape[:, None, None] & shape_inside(shape, u, v)
        alpha = inside[:, None].to(image.dtype)  # alpha: [B, 1, F, F]
        image = image * (1 - alpha) + colors[:, k, :, None, None] * alpha
    # Box-filter the supersamples: exact area coverage up to the sampling grid.
    return F.avg_pool2d(image, supersample)
