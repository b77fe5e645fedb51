"""Pieces shared by the VAE and UNet training loops: clock, checkpoints, data pool, grids."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qlip.world.domain import scene_tensors, training_prompts


@dataclass
class Clock:
    """Wall-clock budget of one training command, so that it stops (and saves) by itself."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.elapsed() >= self.seconds


class Every:
    """True once every ``seconds`` of wall-clock time (for checkpoints and evaluations)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> bool:
        if time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_atomically(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class PromptPool:
    """Training prompts kept on the device: token ids [N, L] and scene tensors [N, K]."""

    input_ids: torch.Tensor
    scenes: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sample(self, batch: int, generator: torch.Generator):
        index = torch.randint(len(self), (batch,), device=self.input_ids.device,
                              generator=generator)
        return self.input_ids[index], {k: v[index] for k, v in self.scenes.items()}


def build_prompt_pool(
    count: int, seed: int, device: torch.device, tokenizer=None, richness_weights=None
) -> PromptPool:
    """``count`` training prompts (no held-out combinations), tokenized once, moved to device.

    Without a tokenizer (VAE training needs only scenes) the ids are an empty [N, 0] tensor.
    """
    prompts = training_prompts(count, seed, richness_weights)
    ids = torch.zeros(count, 0, dtype=torch.long)
    if tokenizer is not None:
        ids = tokenizer(
            [p.text for p in prompts], padding="max_length", truncation=True,
            max_length=tokenizer.model_max_length, return_tensors="pt",
        ).input_ids
    scenes = scene_tensors([p.scene for p in prompts])
    return PromptPool(ids.to(device), {k: v.to(device) for k, v in scenes.items()})


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> None:
    """Save uint8 [N, H, W, 3] images as one PNG grid (``scale``x nearest upsampling)."""
    count, height, width, _ = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
