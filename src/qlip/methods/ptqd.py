"""PTQD (He et al., NeurIPS 2023): Q-Diffusion's recipe with per-tensor weights (preset ``ptqd``:
8-bit weights for conv_in, conv_out and the time-embedding input linear), plus a correction of the
quantization noise at sampling time.

The noise of the quantized prediction is split, per sampling step, into a part correlated with the
FP prediction (``ε_q ≈ (1 + k_t)·ε_fp``), a per-channel bias ``b_t[c]`` and a residual of std
``σ_q(t)``. Sampling corrects ``ε̂ = (ε_q - b_t)/(1 + k_t)`` and, with stochastic DDIM, lowers the
step's own noise so that the residual is absorbed (``pipeline.ptqd_sampling`` wraps the scheduler).
This module holds the statistics and the formulas; gathering them needs a pipeline and lives in
``pipeline.ptqd_sampling``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .qdiffusion import QDiffusionConfig

PREFIX = "ptqd."


@dataclass(frozen=True)
class PTQDConfig:
    """PTQD = Q-Diffusion's weights and activations + correction statistics gathered on DDIM
    trajectories (paper: 1,024 samples, DDIM 20 steps, η = 0)."""

    qdiffusion: QDiffusionConfig = field(default_factory=QDiffusionConfig)
    num_prompts: int = 16  # trajectories (one per prompt); paper: 1,024 samples
    num_steps: int = 20  # DDIM steps of the trajectories; paper: 20
    guidance: float = 7.5  # statistics are taken on the guidance-combined prediction
    batch_size: int = 8
    seed: int = 0
    height: int | None = None  # pixels of the trajectories; None: the pipeline's own
    width: int | None = None

    def __post_init__(self):
        if isinstance(self.qdiffusion, dict):  # from a saved method config
            object.__setattr__(self, "qdiffusion", QDiffusionConfig(**self.qdiffusion))
        if self.num_prompts < 1 or self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("PTQD num_prompts, num_steps and batch_size must be at least 1")


def step_statistics(
    eps_fp: torch.Tensor, eps_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, b[C], σ_q)`` of one sampling step from FP and quantized predictions ``[N, C, H, W]``.

    ``k``: least-squares slope of ``e = ε_q - ε_fp`` on ``ε_fp`` over all elements; ``b[c]``: mean
    per channel of the residual ``e - relu(k)·ε_fp`` (= mean of ``e`` when ``ε_fp`` has zero mean);
    ``σ_q``: std of the residual ``ε_q - (1 + relu(k))·ε_fp - b``.
    """
    x, e = eps_fp.double(), (eps_q - eps_fp).double()
    xc, ec = x - x.mean(), e - e.mean()
    k = (xc * ec).sum() / (xc * xc).sum().clamp_min(1e-30)
    residual = e - torch.relu(k) * x  # [N, C, H, W]
    bias = residual.transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)  # [C]
    sigma = (residual - bias[None, :, None, None]).std()
    return k.float(), bias.float(), sigma.float()


def correct_noise(eps_q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``ε̂ = (ε_q - b)/(1 + relu(k))`` with ``b`` [C] broadcast over ``[B, C, H, W]``."""
    bias = bias.to(eps_q.device, eps_q.dtype).reshape(1, -1, 1, 1)
    scale = 1.0 + torch.relu(torch.as_tensor(k, dtype=torch.float32)).item()
    return (eps_q - bias) / scale


def reduced_noise_std(
    sigma_t: float, alpha_t: float, alpha_prev: float, sigma_q: float
) -> float:
    """PTQD's DDIM noise std once the residual quantization noise ``σ_q`` (already divided by
    ``1 + k``) is absorbed: ``σ'² = σ² - (√(1-ᾱ_prev-σ²) - √(ᾱ_prev(1-ᾱ_t)/ᾱ_t))²·σ_q²``, floored
    at 0 (``alpha_*`` are cumulative products ᾱ)."""
    coefficient = math.sqrt(max(1.0 - alpha_prev - sigma_t**2, 0.0)) - math.sqrt(
        alpha_prev * (1.0 - alpha_t) / alpha_t)
    return math.sqrt(max(sigma_t**2 - coefficient**2 * sigma_q**2, 0.0))


@dataclass
class CorrectionStats:
    """Correction statistics per sampling step of the run they were gathered on (row i = step i)."""

    k: torch.Tensor  # [S]
    bias: torch.Tensor  # [S, C]
    sigma_q: torch.Tensor  # [S]
    timesteps: torch.Tensor  # [S] the scheduler's timestep at each step
    num_steps: int
    scheduler: str  # class name of the scheduler they were gathered with
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def to_extra(self) -> dict[str, torch.Tensor]:
        """Tensors for ``QuantizedInfo.extra`` (saved in ``quant_state.safetensors``)."""
        name = torch.tensor(list(self.scheduler.encode()), dtype=torch.uint8)
        return {f"{PREFIX}k": self.k, f"{PREFIX}bias": self.bias, f"{PREFIX}sigma_q": self.sigma_q,
                f"{PREFIX}timesteps": self.timesteps, f"{PREFIX}num_steps":
                torch.tensor(self.num_steps), f"{PREFIX}scheduler": name}

    @classmethod
    def from_extra(cls, extra: dict[str, torch.Tensor]) -> CorrectionStats | None:
        """The statistics saved with a model, or None when it has none."""
        if f"{PREFIX}k" not in extra:
            return None
        name = bytes(extra[f"{PREFIX}scheduler"].tolist()).decode()
        return cls(extra[f"{PREFIX}k"], extra[f"{PREFIX}bias"], extra[f"{PREFIX}sigma_q"],
                   extra[f"{PREFIX}timesteps"], int(extra[f"{PREFIX}num_steps"]), name)

    def at(self, timestep: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, b[C], σ_q)`` at ``timestep``: the gathered row when the timestep was one of the
        run's, else linear interpolation between the two nearest gathered timesteps (clamped at
        the ends), with a warning (once per statistics object)."""
        ts = self.timesteps.double()
        exact = torch.nonzero(ts == float(timestep)).flatten()
        if len(exact):
            i = int(exact[0])
            return self.k[i], self.bias[i], self.sigma_q[i]
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"PTQD statistics were gathered at the {self.num_steps} timesteps of a "
                f"{self.scheduler} run; timestep {float(timestep):g} and others are interpolated",
                stacklevel=2,
            )
        order = torch.argsort(ts)
        ts_sorted = ts[order]
        t = min(max(float(timestep), float(ts_sorted[0])), float(ts_sorted[-1]))
        hi = int(torch.searchsorted(ts_sorted, torch.tensor(t, dtype=torch.float64)).clamp(
            1, len(ts) - 1)) if len(ts) > 1 else 0
        lo = max(hi - 1, 0)
        span = float(ts_sorted[hi] - ts_sorted[lo])
        w = (t - float(ts_sorted[lo])) / span if span > 0 else 0.0
        i, j = int(order[lo]), int(order[hi])

        def mix(values: torch.Tensor) -> torch.Tensor:
            return (1 - w) * values[i] + w * values[j]

        return mix(self.k), mix(self.bias), mix(self.sigma_q)


def gathered_statistics(
    eps_fp: list[torch.Tensor], eps_q: list[torch.Tensor], timesteps: list[float], scheduler: str
) -> CorrectionStats:
    """Statistics from the predictions recorded at each step (``eps_*[i]``: [N, C, H, W])."""
    rows = [step_statistics(f, q) for f, q in zip(eps_fp, eps_q)]
    return CorrectionStats(
        k=torch.stack([r[0] for r in rows]), bias=torch.stack([r[1] for r in rows]),
        sigma_q=torch.stack([r[2] for r in rows]),
        timesteps=torch.tensor(timesteps, dtype=torch.float32), num_steps=len(rows),
        scheduler=scheduler,
    )
