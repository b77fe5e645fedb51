"""Base-2 logarithmic quantizer for attention probabilities (DGQ), with dynamic scaling."""

from __future__ import annotations

import torch
from torch import nn

from .bits import check_bits, is_bypass
from .rounding import round_ste


def log2_quant(
    x: torch.Tensor, delta: torch.Tensor, levels: torch.Tensor | float, ste: bool = False
) -> torch.Tensor:
    """``x_q = clamp(round(-log2(x/Δ)), 0, levels)``, ``x̂ = Δ·2^(-x_q)``, for x ≥ 0;
    ``levels`` = 2^b - 1 (a number or a tensor broadcasting against ``x``)."""
    ratio = (x / delta).clamp_min(torch.finfo(torch.float32).tiny)
    code = -torch.log2(ratio)
    code = round_ste(code) if ste else torch.round(code)
    if isinstance(levels, torch.Tensor):
        code = torch.minimum(code.clamp_min(0), levels)
    else:
        code = torch.clamp(code, 0, levels)
    return delta * torch.exp2(-code)


class Log2Quantizer(nn.Module):
    """Log2 fake quantizer whose scale Δ is the max of the current tensor (per call), so it needs no
    calibration (DGQ's dynamic scaling of attention probabilities)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_bypass(self.bits):
            return x
        delta = x.detach().amax().clamp_min(1e-12)
        return log2_quant(x, delta, float(2**self.bits - 1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
