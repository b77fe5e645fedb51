"""Uniform affine fake quantizer: per tensor, per channel or per group of channels, optionally with a
table of parameters per sampling step."""

from __future__ import annotations

import torch
from torch import nn

from .bits import check_bits, is_bypass
from .ranges import RANGE_METHODS, affine_params, fake_quant, search_range

__all__ = ["RANGE_METHODS", "UniformQuantizer"]


class UniformQuantizer(nn.Module):
    """Fake-quantizes a tensor on a ``bits``-bit uniform grid.

    Granularity: per tensor (``channel_dim=None``), per channel (``channel_dim`` set) or per group of
    channels (``channel_dim`` and ``group_index`` [C] mapping each channel to a group id). With
    ``num_steps`` the parameters form a table with one row per sampling step, selected by ``step``.

    >>> q = UniformQuantizer(8)
    >>> q.calibrate(torch.randn(1000))
    >>> float((q(torch.tensor([0.5])) - 0.5).abs()) < 0.05
    True
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        channel_dim: int | None = None,
        num_channels: int = 1,
        group_index: torch.Tensor | None = None,
        num_steps: int | None = None,
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.channel_dim = channel_dim
        if group_index is not None:
            if channel_dim is None:
                raise ValueError("group quantization needs channel_dim (the dim the groups split)")
            group_index = group_index.long()
            num_params = int(group_index.max()) + 1
        else:
            num_params = num_channels if channel_dim is not None else 1
        self.register_buffer("group_index", group_index)
        rows = (num_steps,) if num_steps else ()
        self.num_steps = num_steps
        self.scale = nn.Parameter(torch.ones(*rows, num_params), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(*rows, num_params))
        self.register_buffer("calibrated", torch.zeros(*rows, dtype=torch.bool) if rows else torch.tensor(False))
        self.step = 0
        self.ste = False  # set True by methods that train through the rounding

    @property
    def bypass(self) -> bool:
        return is_bypass(self.bits)

    def _reduce_dim(self) -> int | None:
        return self.channel_dim

    def set_range(self, xmin: torch.Tensor, xmax: torch.Tensor, step: int | None = None) -> None:
        """Store the grid covering [xmin, xmax] (shape [P]: one value per tensor/channel/group)."""
        if self.bypass:
            return
        scale, zero = affine_params(xmin.float(), xmax.float(), self.bits, self.symmetric)
        with torch.no_grad():
            if self.num_steps:
                rows = range(self.num_steps) if step is None else [step]
                for r in rows:
                    self.scale[r].copy_(scale.to(self.scale))
                    self.zero_point[r].copy_(zero.to(self.zero_point))
                    self.calibrated[r] = True
            else:
                self.scale.copy_(scale.to(self.scale))
                self.zero_point.copy_(zero.to(self.zero_point))
                self.calibrated.fill_(True)

    def search_range(
        self, x: torch.Tensor, method: str = "minmax", percentile: float = 99.99
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The [xmin, xmax] that ``method`` picks for ``x``, one pair per parameter of this quantizer."""
        return search_range(x, method, self.bits, self.symmetric, self.channel_dim,
                            self.group_index, self.scale.shape[-1], percentile)

    def calibrate(
        self, x: torch.Tensor, method: str = "minmax", step: int | None = None, percentile: float = 99.99
    ) -> None:
        """Set the grid from data ``x`` with a range method (minmax, mse, percentile)."""
        if self.bypass:
            return
        xmin, xmax = self.search_range(x, method, percentile)
        self.set_range(xmin, xmax, step)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (scale, zero) as [P] or [C] vectors (group ids expanded to channels)."""
        scale, zero = self.scale, self.zero_point
        if self.num_steps:
            if not 0 <= self.step < self.num_steps:
                raise ValueError(
                    f"step {self.step} is outside this quantizer's per-step table of "
                    f"{self.num_steps} steps; sample with num_inference_steps={self.num_steps}"
                )
            scale, zero = scale[self.step], zero[self.step]
        if self.group_index is not None:
            scale, zero = scale[self.group_index], zero[self.group_index]
        return scale, zero

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim is None:
            return p.reshape(())
        shape = [1] * x.ndim
        shape[self.channel_dim % x.ndim] = -1
        return p.reshape(shape)

    def check_calibrated(self) -> None:
        """Raise if this quantizer (or a row of its step table) was never calibrated. Reads the
        device, so it runs where weights are dequantized once, never in a forward pass."""
        if not bool(self.calibrated.all()):
            rows = " (every sampling step of its table)" if self.num_steps else ""
            raise RuntimeError(
                f"this {self.bits}-bit quantizer was never calibrated{rows}; run a "
                "quantization method (e.g. qlip.methods.rtn) before using the model"
            )

    def _grid(
        self, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = self.params()
        dtype = dtype or x.dtype
        return self._broadcast(scale, x).to(dtype), self._broadcast(zero, x).to(dtype)

    def quantize_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(x/Δ) + z, 0, 2^b - 1)`` (as floats)."""
        self.check_calibrated()
        scale, zero = self._grid(x)
        return torch.clamp(torch.round(x / scale) + zero, 0, 2**self.bits - 1)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                   check: bool = True) -> torch.Tensor:
        """``(codes - z)·Δ`` in ``dtype``. ``check=False`` skips :meth:`check_calibrated` (a
        read of the device) where the caller checked once before, as a packed layer's forward
        does."""
        if check:
            self.check_calibrated()
        scale, zero = self._grid(codes, dtype)
        return (codes.to(dtype) - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        scale, zero = self._grid(x)
        return fake_quant(x, scale, zero, self.bits, ste=self.ste)

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_dim is None else (
            "group" if self.group_index is not None else "channel")
        steps = f", steps={self.num_steps}" if self.num_steps else ""
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={gran}{steps}"
