"""A bank of activation quantizers: one stacked multi-bit quantizer whose options are the bit-widths
a layer input may run at, chosen per call by a choice tensor (bits are data)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..quant import StackedGrouped, StackedLog2, StackedUniform, UniformSlot, is_bypass

BANK_KINDS = ("uniform", "log2", "grouped")


class ActivationBank(nn.Module):
    """Quantizes one activation at the bit-width a choice names (see :mod:`qlip.quant.stacked`).

    While ``observer`` is set (calibration) inputs are passed to it and returned unquantized;
    while ``enabled`` is False (full-precision reference passes) they are returned unquantized.
    Kinds: ``uniform`` (per tensor, per-step tables with ``num_steps``), ``log2`` (dynamic scale)
    and ``grouped`` (DGQ: ``groups`` groups along one of the candidate ``dims`` per step).

    >>> bank = ActivationBank((8, 16))
    >>> bank.slot(8).calibrate(torch.randn(100)); bank.slot(16).calibrate(torch.randn(100))
    >>> y = bank(torch.randn(2, 4), torch.tensor(0))  # both rows at 8 bits
    """

    def __init__(
        self, options: Iterable[int], kind: str = "uniform", symmetric: bool = False,
        num_steps: int | None = None, groups: int = 1, dims: tuple[int, ...] = (-1,),
    ):
        super().__init__()
        if kind not in BANK_KINDS:
            raise ValueError(f"activation bank kind must be one of {BANK_KINDS}; got {kind!r}")
        options = tuple(options)
        self.kind = kind
        self.dims = tuple(dims) if kind == "grouped" else ()  # DGQ's candidate dims
        if kind == "log2":
            self.stack = StackedLog2(options)
        elif kind == "grouped":
            if symmetric:
                raise ValueError("grouped (DGQ) activation quantizers are asymmetric; drop "
                                 "act_symmetric")
            self.stack = StackedGrouped(options, groups, dims, num_steps)
        else:
            self.stack = StackedUniform(options, symmetric=symmetric, num_steps=num_steps)
        self.observer: Callable[[torch.Tensor, int], None] | None = None
        self.enabled = True
        self.step = 0  # the sampling step observers record under

    @property
    def options(self) -> tuple[int, ...]:
        return self.stack.options

    @property
    def num_steps(self) -> int | None:
        return self.stack.num_steps

    def slot(self, bits: int) -> UniformSlot:
        """The quantizer of one bit-width, to calibrate (uniform banks)."""
        return self.stack.slot_view(bits)

    def passes_through(self) -> bool:
        """True while the bank returns its input unquantized and unobserved (full-precision
        reference passes): a unit may then take its plain path."""
        return not self.enabled and self.observer is None

    def slots(self) -> list[UniformSlot]:
        """Every option that needs calibration: none for log2 banks and for the bypass (32).
        Grouped banks are calibrated together by DGQ, not per bit-width: asking raises."""
        if self.kind == "log2":
            return []
        if self.kind == "grouped":
            self.stack.slot_view(self.options[0])  # raises, saying which method calibrates it
        return [self.stack.slot_view(b) for b in self.options if not is_bypass(b)]

    def forward(
        self, x: torch.Tensor, choice: torch.Tensor, heads: int = 1,
        step: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x, self.step)
            return x
        if not self.enabled:
            return x
        # a plain call, the submodule read from _modules: eager pays for every Python step
        return self._modules["stack"].forward(x, choice, heads, step)

    def extra_repr(self) -> str:
        return self.kind
