"""AdaRound: learnable rounding of weights on a fixed uniform grid (Nagel et al., 2020), as
Q-Diffusion uses it inside BRECQ reconstruction.

Each weight is ``floor(w/Δ) + h(α)`` on the grid, where ``h`` is a rectified sigmoid in [0, 1];
a regulariser pushes ``h`` to 0 or 1, after which the rounding is frozen to integer codes.
"""

from __future__ import annotations

import torch
from torch import nn

from .uniform import UniformQuantizer

GAMMA, ZETA = -0.1, 1.1  # stretch of the rectified sigmoid (AdaRound's values)


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(α) = clamp(σ(α)·(ζ - γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def alpha_for(rest: torch.Tensor) -> torch.Tensor:
    """The α with ``h(α) = rest`` for a fractional part ``rest`` in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def annealed_beta(
    iteration: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
) -> float | None:
    """β of the rounding regulariser: None during the warm-up (no regulariser), then linear from
    ``start`` to ``end`` over the remaining iterations.

    >>> annealed_beta(0, 100), annealed_beta(20, 100), annealed_beta(100, 100)
    (None, 20.0, 2.0)
    """
    begin = int(warmup * total)
    if iteration < begin:
        return None
    progress = (iteration - begin) / max(total - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


class AdaRoundQuantizer(nn.Module):
    """Learnable rounding of one weight tensor on ``quantizer``'s grid (its scale and zero-point are
    reused, per tensor or per output channel; nothing loops over channels).

    It stands in for the layer's weight quantizer while the rounding trains: ``forward`` ignores
    its argument and returns the dequantized weight (soft rounding, or hard once ``hard`` is set).

    >>> q = UniformQuantizer(4, channel_dim=0, num_channels=3)
    >>> w = torch.randn(3, 5)
    >>> q.calibrate(w)
    >>> ada = AdaRoundQuantizer(q, w)
    >>> bool(((ada.codes() - q.quantize_codes(w)).abs() <= 1).all())
    True
    """

    ste = True  # tells QuantLayer to call forward() instead of dequantizing stored codes

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor):
        super().__init__()
        if quantizer.bypass:
            raise ValueError("AdaRound needs a real weight quantizer (2..16 bits), not a bypass")
        scale, zero = quantizer._grid(weight.detach().float())
        self.bits = quantizer.bits
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        scaled = weight.detach().float() / scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(0.0, 1.0 - 1e-6)
        self.alpha = nn.Parameter(alpha_for(rest))
        self.hard = False
        self.out_dtype = weight.dtype

    def rounding(self) -> torch.Tensor:
        """0/1 (hard) or in [0, 1] (soft) offset added to ``floor(w/Δ)``."""
        if self.hard:
            return (self.alpha >= 0).to(self.floor.dtype)
        return rectified_sigmoid(self.alpha)

    def codes(self) -> torch.Tensor:
        """Integer codes of the hard rounding, ``clamp(floor + [α ≥ 0] + z, 0, 2^b - 1)``."""
        with torch.no_grad():
            hard = (self.alpha >= 0).to(self.floor.dtype)
            return torch.clamp(self.floor + hard + self.zero_point, 0, 2**self.bits - 1)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        codes = torch.clamp(self.floor + self.rounding() + self.zero_point, 0, 2**self.bits - 1)
        return ((codes - self.zero_point) * self.scale).to(self.out_dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ 1 - |2h - 1|^β``: zero when every rounding variable sits at 0 or 1."""
        h = rectified_sigmoid(self.alpha)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
