"""The per-tensor fake quantizer of a stacked bank in one kernel launch, for eager inference on
the GPU.

:class:`qlip.quant.stacked.StackedUniform` computes ``clamp(round(x/Δ), −z, 2^b−1−z)·Δ`` with
``(Δ, −z, 2^b−1−z)`` gathered from its table by the chosen row, then ``where(bypass, x, ·)``:
in eager PyTorch that is five to seven kernel launches per quantizer call (the gathers, div,
round, clamp, mul, where), and on a UNet step with some 300 quantizer calls the launches, not
the arithmetic, set the time. The kernel here reads the row index and the bypass flag from
device memory (bits stay data: no host sync, no recompilation, CUDA-graph capturable) and does
the whole computation in one pass over ``x``.

It gives the same values as the PyTorch path, bit for bit: every operation is computed in fp32
and rounded to ``x``'s dtype where PyTorch rounds (after the division and after the product),
the division is IEEE round-to-nearest (``div_rn``, as PyTorch's CUDA division), and rounding is
half-to-even (``torch.round``). A compiled graph does not use it: Inductor fuses the PyTorch
path into one kernel anyway, with its neighbours.

Written by hand: PyTorch's ``fake_quantize_per_tensor_affine`` takes its integer range as Python
ints, so it cannot follow a bit-width that is data, and nothing in ATen clamps to bounds read
from a gathered row in one kernel.
"""

from __future__ import annotations

import torch

try:  # Triton ships with PyTorch's CUDA wheels; without it the PyTorch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x`` (CUDA, Triton installed, a float dtype it handles)."""
    return triton is not None and x.is_cuda and x.dtype in DTYPES


def reference(x: torch.Tensor, table: torch.Tensor, choice: torch.Tensor,
              step: torch.Tensor | None, steps: int, bypass: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in PyTorch. ``table [K·T, 3]`` in x's dtype (option k at step t
    is row ``k·T + t``, T = ``steps`` or 1), ``choice [1]`` long (the option), ``step [1]`` long
    (None without per-step rows), ``bypass [K]`` bool (None: the bank has no bypass option)."""
    rows = choice if not steps else step + choice * steps
    scale, low, high = table.index_select(0, rows).unbind(1)
    out = torch.div(x, scale).round_().clamp_(low, high).mul_(scale)
    return out if bypass is None else torch.where(bypass.index_select(0, choice), x, out)


if triton is not None:

    @triton.jit
    def round_half_even(x):
        """``torch.round``: to the nearest integer, ties to even (fp32)."""
        f = tl.floor(x + 0.5)
        tie = (f - x) == 0.5
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(tie & odd, f - 1.0, f)

    @triton.jit
    def load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS: tl.constexpr):
        """``(choice, Δ, low, high)``: the chosen option and its table row (at the step's row
        with per-step tables), read on the device; the grid values in fp32."""
        choice = tl.load(choice_ptr)
        row = choice
        if HAS_STEPS:
            row = choice * steps + tl.load(step_ptr)
        scale = tl.load(table_ptr + row * 3).to(tl.float32)
        low = tl.load(table_ptr + row * 3 + 1).to(tl.float32)
        high = tl.load(table_ptr + row * 3 + 2).to(tl.float32)
        return choice, scale, low, high

    @triton.jit
    def grid_codes(x, scale, low, high):
        """The integer codes ``clamp(round(x/Δ), low, high)`` (fp32) of ``x`` as PyTorch computes
        them in x's dtype: the quotient rounded to that dtype, then half to even."""
        q = tl.math.div_rn(x.to(tl.float32), scale).to(x.dtype, fp_downcast_rounding="rtne")
        return tl.clamp(round_half_even(q.to(tl.float32)), low, high,
                        propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _fake_quantize_kernel(x_ptr, out_ptr, table_ptr, choice_ptr, step_ptr, bypass_ptr, n,
                              steps, HAS_STEPS: tl.constexpr, HAS_BYPASS: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        dtype = x.dtype
        q = grid_codes(x, scale, low, high)
        y = (q * scale).to(dtype, fp_downcast_rounding="rtne")
        if HAS_BYPASS:
            y = tl.where(tl.load(bypass_ptr + choice) != 0, x, y)
        tl.store(out_ptr + offs, y, mask=mask)


def _dense(x: torch.Tensor) -> bool:
    """Its elements fill its storage without gaps in some order (element-wise work can run over
    the memory as one flat array, and ``empty_like`` gives the same strides)."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def fake_quantize(x: torch.Tensor, table: torch.Tensor, choice: torch.Tensor,
                  step: torch.Tensor | None, steps: int, bypass: torch.Tensor | None
                  ) -> torch.Tensor:
    """:func:`reference` in one Triton launch (``x`` on CUDA, see :func:`available`); the
    option, the step and the bypass flag are read on the device."""
    if not _dense(x):
        x = x.contiguous()
    out = torch.empty_like(x)  # a dense x keeps its layout (channels-last stays channels-last)
    n = x.numel()
    if n == 0:
        return out
    _fake_quantize_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, table, choice, step if steps else choice, bypass if bypass is not None else choice,
        n, steps, HAS_STEPS=bool(steps), HAS_BYPASS=bypass is not None, BLOCK_SIZE=BLOCK)
    return out
