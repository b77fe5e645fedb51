"""Activation statistics observers: attached for calibration, removed after."""

from __future__ import annotations

import torch


class RangeObserver:
    """Tracks the min and max of every tensor it sees, per sampling step when asked, and keeps an
    evenly strided sample of up to ``max_samples`` values per step for mse/percentile range search.
    """

    def __init__(self, max_samples: int = 0, per_step: bool = False, samples_per_call: int = 16384):
        self.max_samples = max_samples
        self.per_step = per_step
        self.samples_per_call = samples_per_call
        self.mins: dict[int, torch.Tensor] = {}
        self.maxs: dict[int, torch.Tensor] = {}
        self.samples: dict[int, list[torch.Tensor]] = {}
        self._kept: dict[int, int] = {}

    def __call__(self, x: torch.Tensor, step: int = 0) -> None:
        key = step if self.per_step else 0
        x = x.detach().float()
        lo, hi = x.amin(), x.amax()
        if key in self.mins:
            self.mins[key] = torch.minimum(self.mins[key], lo)
            self.maxs[key] = torch.maximum(self.maxs[key], hi)
        else:
            self.mins[key], self.maxs[key] = lo, hi
        kept = self._kept.get(key, 0)
        if self.max_samples and kept < self.max_samples:
            flat = x.reshape(-1)
            take = min(self.samples_per_call, self.max_samples - kept, flat.numel())
            stride = max(flat.numel() // take, 1)
            sample = flat[::stride][:take].cpu()
            self.samples.setdefault(key, []).append(sample)
            self._kept[key] = kept + sample.numel()

    @property
    def steps(self) -> list[int]:
        return sorted(self.mins)

    def range(self, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mins[step].reshape(1), self.maxs[step].reshape(1)

    def sample(self, step: int = 0) -> torch.Tensor:
        if step not in self.samples:
            raise RuntimeError("this observer kept no samples; create it with max_samples > 0")
        return torch.cat(self.samples[step])
