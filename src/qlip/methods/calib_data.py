"""Calibration data as rows of UNet inputs (x_t, t, c) with their sampling-step index; cached as
safetensors, fed to a UNet step by step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm


@dataclass
class CalibrationSet:
    """Rows of UNet inputs. ``steps`` is the sampling-step index each row was captured at."""

    latents: torch.Tensor  # [N, C, H, W]  x_t
    timesteps: torch.Tensor  # [N]
    text: torch.Tensor  # [N, L, D]  encoder_hidden_states (conditional or unconditional)
    steps: torch.Tensor  # [N] long

    def __len__(self) -> int:
        return self.latents.shape[0]

    def save(self, path: str | Path) -> None:
        tensors = {k: v.contiguous().cpu() for k, v in vars(self).items()}
        save_file(tensors, str(path), metadata={"format": "qlip-calibration", "version": "1"})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        return cls(**load_file(str(path)))

    def subset(self, index: torch.Tensor) -> CalibrationSet:
        return CalibrationSet(*(t[index] for t in vars(self).values()))

    def by_step(self, batch_size: int) -> Iterator[tuple[int, CalibrationSet]]:
        """Batches that each hold rows of one sampling step (per-step tables need that)."""
        for step in torch.unique(self.steps).tolist():
            rows = torch.nonzero(self.steps == step).flatten()
            for start in range(0, len(rows), batch_size):
                yield step, self.subset(rows[start : start + batch_size])



def run_calibration(
    unet: nn.Module, data: CalibrationSet, units: dict, batch_size: int = 8, progress: bool = True
) -> None:
    """Feed the captured inputs through the UNet, step by step, telling the units the step index."""
    device, dtype = unet.device, unet.dtype
    batches = list(data.by_step(batch_size))
    with torch.no_grad():
        for step, batch in tqdm(batches, desc="calibrating", disable=not progress):
            for unit in units.values():
                unit.set_step(step)
            unet(batch.latents.to(device, dtype), batch.timesteps.to(device),
                 encoder_hidden_states=batch.text.to(device, dtype))
