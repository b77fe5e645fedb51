"""Real execution of A8 GEMMs in fp8: Hopper's e4m3 tensor cores through ``torch._scaled_mm``.

The integer kernels of :mod:`qlip.quant.real_gemm` reproduce the simulation exactly. This path
does not: it is the "fp8 where it pays on Hopper" of issue 14, for the layers whose every option
is A8 (a fixed W4A8 model), and it is a different activation quantizer, measured against the
integer one rather than assumed equal.

**Weights, exactly.** A weight code of at most 4 bits minus its zero point lies in ``[−15, 15]``,
and every integer of magnitude at most 16 is exact in e4m3 (three mantissa bits). So the weight
side is the simulation's: ``ŵ = (w_c − z_w)·s_w``, the centered codes in e4m3 and ``s_w`` the
GEMM's per-column scale. Wider codes are not exact in e4m3 and such layers stay on the integer
kernels (:func:`fp8_weights` returns None).

**Activations, not exactly.** The A8 grid ``[low·Δ, high·Δ]`` the calibration chose (read from
the bank's table at the step's option: bits as data, no host sync) becomes the clipping range,
mapped onto e4m3's ``±448`` by one static scale ``s_a = max(−low, high)·Δ / 448``:
``x̂ = e4m3(clamp(x, low·Δ, high·Δ) / s_a)·s_a``. The same values clip as in the integer grid;
within the range the spacing is relative (3 mantissa bits: ``2^−4`` of a value's magnitude
half a step) instead of uniform (``Δ/2``): finer than int8 near zero, coarser near the range's
ends. How far that moves a model's outputs and images is measured, not assumed
(``docs/results/speed/``).

**The product.** ``torch._scaled_mm`` with row-wise scales (``s_a`` for every row, ``s_w`` for
every column), x's dtype out; the bias added after. The accumulation is not exact fp32 on
Hopper, even without ``use_fast_accum``: on an H100 an fp32 output differed from the float64
product of the same e4m3 operands by up to 9e-5 of its largest value (the nineteenth session),
about 2^-13, which matches the tensor cores' reduced-precision fp8 accumulation. The activations' cast is
PyTorch ops, which a compiled graph fuses into the kernel producing the layer's input.

**Packed weights.** A packed layer (``qlip.nn.pack_weights``: 4-bit codes two a byte, a
quarter of bf16's bytes) keeps only its bytes: every call unpacks them to the e4m3 weights of
that one GEMM (:func:`fp8_weight_matrix`; the same exact values), which live until the product
is done. The model's weight memory stays the packed bytes', and the step pays one read of them
and one e4m3 write a layer. On CUDA the unpacking is one hand-written Triton launch
(:func:`unpack_e4m3`, an opaque custom operator in compiled graphs; ``real_gemm.UNPACK_PACKED``,
on by default); without it, PyTorch ops that a compiled graph fuses. On an H100 the packed SDXL
step at batch 8 ran at 1.10× bf16 with PyTorch's ops and at 0.944× with the launch (the
twenty-third and twenty-fourth sessions; ``benchmarks/fp8_unpack_cost.py`` times the two per
GEMM shape).

Written with PyTorch's own fp8 GEMM, not by hand: cuBLASLt's fp8 kernels are what Hopper's
vendor tunes; the Triton int8 GEMM of :mod:`~qlip.quant.real_gemm` exists because no library
fuses integer quantization, zero points and the per-step choice into one launch.
"""

from __future__ import annotations

import torch

from . import real_gemm
from .real_gemm import centered_codes, option_grid, unpack_centered, unpack_rows

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
E4M3_EXACT = 16  # every integer of at most this magnitude is exact in e4m3
# torch._scaled_mm's use_fast_accum: on Hopper, accumulate in the tensor cores' own reduced
# precision instead of promoting to fp32 every few K-steps (faster, less exact)
FAST_ACCUM = False


def unpack_e4m3(packed: torch.Tensor, w_zero: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`fp8_weight_matrix` of packed bytes (uint8 ``[N, ceil(k/2)]``, zero points
    ``[N]``) by one Triton launch (:func:`~qlip.quant.real_gemm.unpack_centered`): the
    ``[N, k]`` e4m3 centered codes."""
    return unpack_centered(packed, w_zero, k, E4M3)


# the operator, for compiled graphs (an opaque launch, its output's shape from the fake)
_unpack_op = torch.library.custom_op("qlip::unpack_e4m3", mutates_args=())(unpack_e4m3)


@_unpack_op.register_fake
def _(packed, w_zero, k):
    return packed.new_empty((packed.shape[0], k), dtype=E4M3)


def supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs e4m3 on ``device``: the CPU, or a CUDA GPU of compute
    capability 8.9 or newer (Ada, Hopper)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_weights(w: torch.Tensor, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
                k: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The fp8 weight operands of a layer from :func:`~qlip.quant.real_gemm.weight_operands`'
    integer ones: ``(w8, scale_b, w_zero)``, the per-column scales ``scale_b`` ``[1, N]`` fp32
    and either the centered codes ``w8`` ``[N, K]`` in e4m3 (exact; ``w_zero`` None) or, for
    packed codes (uint8 ``[N, ceil(K/2)]``, ``k`` their K), the packed bytes themselves and
    their zero points ``[N]`` (int32), which :func:`fp8_weight_matrix` turns into the same e4m3
    matrix at every call. None where a centered code exceeds ±16 (not exact in e4m3: weights of
    more than 4 bits) or the shape is not a multiple of 16 (``torch._scaled_mm``'s rule)."""
    scale_b = w_scale.reshape(1, -1).to(torch.float32).contiguous()
    if w.dtype == torch.uint8:  # packed 4-bit codes: centered, within ±15, always exact
        if k is None:
            raise ValueError("packed codes need their K (k=): a byte holds two codes")
        if w.shape[0] % 16 or k % 16:
            return None
        return w, scale_b, w_zero.to(torch.int32).contiguous()
    codes = centered_codes(w, w_zero)
    n, k = codes.shape
    if n % 16 or k % 16 or (codes.numel() and int(codes.abs().max()) > E4M3_EXACT):  # (setup)
        return None
    return codes.to(torch.float32).to(E4M3).contiguous(), scale_b, None


def fp8_weight_matrix(w8: torch.Tensor, w_zero: torch.Tensor | None, k: int) -> torch.Tensor:
    """The ``[N, k]`` e4m3 weight matrix of :func:`fp8_weights`' operands: ``w8`` itself, or
    (packed bytes) their codes minus the zero points, unpacked here: by PyTorch ops, or on CUDA
    with ``real_gemm.UNPACK_PACKED`` by :func:`unpack_e4m3`'s one launch (the same values)."""
    if w8.dtype != torch.uint8:
        return w8
    if w8.is_cuda and real_gemm.unpack_wanted(w8, w_zero):  # (the CPU's fp8 runs no Triton)
        if torch.compiler.is_compiling():
            return torch.ops.qlip.unpack_e4m3(w8, w_zero, k)
        return unpack_e4m3(w8, w_zero, k)
    return centered_codes(unpack_rows(w8, k), w_zero).to(torch.float32).to(E4M3)


def fp8_activation_scale(table: torch.Tensor, choice: torch.Tensor, step: torch.Tensor,
                         steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The option's clipping range and e4m3 scale from the bank's table ``[K·T, 3]`` (Δ, low,
    high), gathered on the device: ``(lo, hi, s_a)``, fp32 ``[1]`` each."""
    scale, low, high = (t.float() for t in option_grid(table, choice, step, steps))
    lo, hi = low * scale, high * scale
    return lo, hi, torch.maximum(-lo, hi).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX


def fp8_codes(x2: torch.Tensor, lo, hi, s_a) -> torch.Tensor:
    """``x2 [M, K]`` clipped to ``[lo, hi]`` and cast to e4m3 in units of ``s_a`` (round to
    nearest even; within ±448 by construction, so never NaN)."""
    return (torch.minimum(torch.maximum(x2.float(), lo), hi) / s_a).to(E4M3)


def fp8_linear(x: torch.Tensor, table: torch.Tensor, choice: torch.Tensor, step: torch.Tensor,
               steps: int, w8: torch.Tensor, scale_b: torch.Tensor, w_zero: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K]`` through a layer whose option is A8, in fp8: returns ``[..., N]`` in x's
    dtype. ``table``/``choice``/``step``/``steps`` as :func:`~qlip.quant.real_gemm.real_linear`
    takes them (the bank's flat table, the option, the step); ``w8``/``scale_b``/``w_zero``
    from :func:`fp8_weights` (packed bytes are unpacked here, for this call)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n = scale_b.shape[1]
    w8 = fp8_weight_matrix(w8, w_zero, k)
    lo, hi, s_a = fp8_activation_scale(table, choice, step, steps)
    a8 = fp8_codes(x2, lo, hi, s_a)
    if x.is_cuda:  # row-wise scales: s_a for every row, s_w for every column, in the epilogue
        out = torch._scaled_mm(a8, w8.t(), scale_a=s_a.expand(x2.shape[0], 1).contiguous(),
                               scale_b=scale_b, out_dtype=x.dtype, use_fast_accum=FAST_ACCUM)
    else:  # torch's CPU kernel (oneDNN) takes one scale a tensor (torch 2.11): the columns'
        # scales after, on the fp32 product
        one = torch.ones((), device=x.device)
        out = (torch._scaled_mm(a8, w8.t(), scale_a=s_a.reshape(()), scale_b=one,
                                out_dtype=torch.float32) * scale_b).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


def fp8_reference(x: torch.Tensor, table: torch.Tensor, choice: torch.Tensor, step: torch.Tensor,
                  steps: int, w8: torch.Tensor, scale_b: torch.Tensor,
                  w_zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """What :func:`fp8_linear` computes, in float64 from the same e4m3 operands: for the tests
    and for measuring the fp8 path against the integer simulation."""
    k = x.shape[-1]
    w8 = fp8_weight_matrix(w8, w_zero, k)
    lo, hi, s_a = fp8_activation_scale(table, choice, step, steps)
    a = fp8_codes(x.reshape(-1, k), lo, hi, s_a).double() * s_a.double()
    out = a @ (w8.double() * scale_b.double().t()).t()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], w8.shape[0])
