"""A bank of activation quantizers, one per allowed bit-width, so a layer can switch bits per call."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..quant import Log2Quantizer, UniformQuantizer, check_bits, is_bypass

QuantizerFactory = Callable[[int], nn.Module]


def uniform_factory(
    symmetric: bool = False, num_steps: int | None = None
) -> QuantizerFactory:
    """Per-tensor uniform activation quantizers (Q-Diffusion's activations)."""
    return lambda bits: UniformQuantizer(bits, symmetric=symmetric, num_steps=num_steps)


def log2_factory() -> QuantizerFactory:
    return Log2Quantizer


class ActivationBank(nn.Module):
    """Holds one quantizer per bit-width in ``options``; ``forward(x, bits)`` uses the one for ``bits``
    (32 = bypass). While ``observer`` is set (calibration), inputs are passed to it and returned
    unquantized.
    """

    def __init__(self, options: Iterable[int], factory: QuantizerFactory | None = None):
        super().__init__()
        self.options = tuple(sorted({check_bits(b, "activation bits") for b in options}))
        if not self.options:
            raise ValueError("an activation bank needs at least one bit-width option")
        factory = factory or uniform_factory()
        self.quantizers = nn.ModuleDict(
            {str(b): factory(b) for b in self.options if not is_bypass(b)}
        )
        self.observer: Callable[[torch.Tensor, int], None] | None = None
        self.step = 0

    def quantizer(self, bits: int) -> nn.Module:
        key = str(bits)
        if key not in self.quantizers:
            raise ValueError(
                f"activation bits {bits} not in this layer's bank {self.options}; quantize the model "
                f"with --abits-options including {bits}"
            )
        return self.quantizers[key]

    def set_step(self, step: int) -> None:
        self.step = step
        for q in self.quantizers.values():
            q.step = step

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x, self.step)
            return x
        if is_bypass(bits):
            return x
        return self.quantizer(bits)(x)
