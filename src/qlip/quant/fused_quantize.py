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

import inspect
import os

import torch

try:  # Triton ships with PyTorch's CUDA wheels; without it the PyTorch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fixed_tile() -> bool:
    """Whether the autotuned kernels (real GEMM and convolution, fused attention) launch with
    their first tile instead of timing every tile once per shape: under the interpreter, which
    cannot time, and with ``QLIP_AUTOTUNE=0``. Tuning compiles every tile for each flag
    combination and times every tile on each new shape, which costs minutes for a few
    milliseconds saved: right for a long run, not for a test suite (the tests set it) or a short
    script."""
    return interpreted() or os.environ.get("QLIP_AUTOTUNE", "1") == "0"


# Autotuning times each tile of a shape with triton.testing.do_bench: by default 25 ms of warm-up
# and 100 ms of repeats per tile. The SD 1.4 UNet has 47 distinct real GEMM/conv shapes, so that
# is about 47 s of timing per real variant. These kernels take from microseconds to about a
# millisecond, so 5 + 25 ms still averages tens to thousands of launches per tile.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def tuner(configs, key: list[str]):
    """``triton.autotune`` over ``configs``, timed once per value of the ``key`` arguments with
    :data:`TUNE_WARMUP_MS`/:data:`TUNE_REP_MS` (where this Triton takes a ``do_bench``), its
    choices kept in Triton's on-disk cache (where it takes ``cache_results``): a later process
    on the same GPU and Triton reads each shape's tile instead of compiling and timing all of
    them, so a model's first call costs minutes once per machine, not once per process."""
    options = {}
    params = inspect.signature(triton.autotune).parameters
    if "do_bench" in params:
        options["do_bench"] = lambda call, quantiles: triton.testing.do_bench(
            call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)
    if "cache_results" in params:
        options["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **options)


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x`` (CUDA, Triton installed, a float dtype it handles)."""
    return triton is not None and x.is_cuda and x.dtype in DTYPES


def reference(x: torch.Tensor, table: torch.Tensor, choice: torch.Tensor,
              step: torch.Tensor | None, steps: int, bypass: torch.Tensor | None,
              heads: int = 1) -> torch.Tensor:
    """What the kernel computes, in PyTorch. ``table [K·T, 3]`` in x's dtype (option k at step t
    is row ``k·T + t``, T = ``steps`` or 1), ``choice`` ``[1]`` long (the option of the whole
    tensor) or ``[n]`` (one per image, x's rows laid out ``[copies, n, heads]`` as
    :class:`qlip.quant.stacked.RowLayout` says), ``step [1]`` long (None without per-step rows),
    ``bypass [K]`` bool (None: the bank has no bypass option)."""
    rows = choice if not steps else step + choice * steps
    params = table.index_select(0, rows)  # [n, 3]
    n = choice.shape[0]
    per_row = params.repeat_interleave(heads, 0).repeat(x.shape[0] // (n * heads), 1)  # [R, 3]
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    scale, low, high = (per_row[:, i].reshape(shape) for i in range(3))
    out = torch.div(x, scale).round_().clamp_(low, high).mul_(scale)
    if bypass is None:
        return out
    flag = bypass.index_select(0, choice).repeat_interleave(heads).repeat(x.shape[0] // (n * heads))
    return torch.where(flag.reshape(shape), x, out)


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
        with per-step tables), read on the device; the grid values in fp32. ``choice_ptr`` is
        one pointer (a scalar option) or a block of them (an option per element)."""
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
                              steps, row_size, heads, images, HAS_STEPS: tl.constexpr,
                              HAS_BYPASS: tl.constexpr, PER_IMAGE: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        if PER_IMAGE:  # rows [copies, images, heads]: each element's image picks its option
            image = (offs // row_size // heads) % images
            choice_ptr = choice_ptr + tl.where(mask, image, 0)
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
                  step: torch.Tensor | None, steps: int, bypass: torch.Tensor | None,
                  heads: int = 1) -> torch.Tensor:
    """:func:`reference` in one Triton launch (``x`` on CUDA, see :func:`available`); the
    option (or each image's), the step and the bypass flag are read on the device."""
    images = choice.shape[0]
    per_image = images > 1
    if per_image and (x.ndim < 1 or x.shape[0] % (images * heads)):
        raise ValueError(f"a batch of {x.shape[0] if x.ndim else 0} rows cannot hold {images} "
                         f"images × {heads} heads; per-image bits need the UNet batch to be "
                         "whole copies of the image batch")
    # per image, the row index is read off the flat position, so x must be row-major; the
    # whole batch only needs x dense (channels-last stays channels-last)
    if not (x.is_contiguous() if per_image else _dense(x)):
        x = x.contiguous()
    if per_image:  # the kernel reads choice[image] at unit stride (an expanded choice is not)
        choice = choice.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    row_size = n // x.shape[0] if per_image else 1
    _fake_quantize_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, table, choice, step if steps else choice, bypass if bypass is not None else choice,
        n, steps, row_size, heads, images, HAS_STEPS=bool(steps), HAS_BYPASS=bypass is not None,
        PER_IMAGE=per_image, BLOCK_SIZE=BLOCK)
    return out
