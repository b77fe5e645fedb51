"""Real low-precision execution of a quantized KH×KW convolution (any stride, no dilation, one
group), whose activation bits are data: an implicit GEMM in one Triton launch, the same
integer bracket as :mod:`qlip.quant.real_gemm`'s Linear layers.

The GEMM's rows are the output pixels (``M = B·H_out·W_out``), its columns the output channels
and its reduction the ``K = C·KH·KW`` taps, walked tap by tap (``kh, kw``) and, within a tap, over
blocks of input channels. Output pixel ``(ho, wo)`` reads tap ``(kh, kw)`` at input row
``ho·SH + kh − PH`` and column ``wo·SW + kw − PW`` (``SH, SW`` the stride: the UNet's
downsamplers are 3×3 convs of stride 2). The input is read channels-last (``[B, H, W, C]``):
a tap's block of channels is contiguous. The weight codes ``[N, K]`` come in one of two orders:

- the layer's own, ``k = c·KH·KW + kh·KW + kw`` (``weight.flatten(1)``): a tap's channels lie
  KH·KW codes apart, so each weight tile is a strided gather;
- tap-major (``tap_major=True``, :func:`tap_major_rows`), ``k = (kh·KW + kw)·C + c``: a tap's
  channels are contiguous, as the input's are. Real execution keeps its int8 codes this way (a
  copy it makes anyway), and a packed conv keeps its bytes this way in memory
  (``QuantLayer.pack_weights``; files keep the layer's order).

Either as int8 or as the packed 4-bit bytes of :func:`qlip.quant.real_gemm.pack_rows` (for an
even K, a packed layer's own bytes: no second copy of the weights). Packed tap-major bytes of an
even C hold whole pairs of a tap's channels, so a tile reads them 16 at a time, as the packed
GEMM does; in any other case the kernel gathers each channel's byte.

**Padding, exactly.** The simulation quantizes the input, then pads it with zeros. A padded tap
is a zero of the quantized input: its code is 0, so its int8 value is ``a = z_a`` (``a − z_a =
0``) and it adds nothing to the bracket, whatever the grid's range; it still counts in the row's
sum of codes, as every real tap does. The input's int8 codes are written once per call already
padded (:func:`padded_codes`, ``[B, H + 2·PH, W + 2·PW, C]``, the border holding
``a = z_a``): the GEMM's loop then reads every tap as a plain block of memory, masked only at the
matrix's edges, with no per-element choice between a pixel and the padding, so its tiles can
go from memory to the tensor cores without passing through registers. So at options of at most
8 bits the output is the exact product of the simulation's quantized operands, rounded once to
fp32, as for a Linear layer. At A16/A32 the unquantized input (zeros padded) times the
dequantized weights, in float math.

Written by hand: cuDNN's int8 convolutions take integer tensors only (the quantization, the zero
points and the choice of integer or float math would be separate launches with a host branch),
and PyTorch exposes none of them for a zero-point layout like this.
"""

from __future__ import annotations

import torch

from . import real_gemm
from .fused_quantize import triton
from .real_gemm import MAX_K, TILES, autotuned, launch, zero_mode

if triton is not None:
    import triton.language as tl

    from .fused_quantize import grid_codes, load_grid
    from .real_gemm import (
        _float_weight,
        _next_tile,
        _persistent_epilogue,
        _tma_weights,
        _weight_block,
    )

# The channel block of a tap is the GEMM tiles' BLOCK_K (real_gemm.TILES): every
# one is at least 32 channels, what a tap's int8 product needs.


def tap_major_rows(codes: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """``codes [N, C·KH·KW]`` in the weight's own order -> ``[N, KH·KW·C]``, tap-major (a tap's
    channels contiguous); :func:`channel_major_rows` undoes it."""
    n, k = codes.shape
    kh, kw = kernel_size
    return codes.reshape(n, k // (kh * kw), kh, kw).permute(0, 2, 3, 1).reshape(n, k).contiguous()


def channel_major_rows(codes: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`tap_major_rows`."""
    n, k = codes.shape
    kh, kw = kernel_size
    return codes.reshape(n, kh, kw, k // (kh * kw)).permute(0, 3, 1, 2).reshape(n, k).contiguous()


def reference(x, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias,
              kernel_size: tuple[int, int], padding: tuple[int, int], tap_major: bool = False,
              stride: tuple[int, int] = (1, 1)):
    """What the kernel computes, in PyTorch float64: ``x [B, C, H, W]``; ``w`` the ``[N, K]``
    codes (int8, or packed uint8; tap-major where ``tap_major``); returns
    ``[B, N, H_out, W_out]`` in x's dtype."""
    from .real_gemm import unpack_rows

    k_total = x.shape[1] * kernel_size[0] * kernel_size[1]
    if w.dtype == torch.uint8:
        w = unpack_rows(w, k_total)
    if tap_major:
        w = channel_major_rows(w, kernel_size)
    k = int(choice.reshape(-1)[0])
    row = k * steps + int(step.reshape(-1)[0]) if steps else k
    scale, low, high = (table[row, i] for i in range(3))
    if w_zero is None:  # centered codes
        w_zero = w.new_zeros(w.shape[0], dtype=torch.int32)
    weight = ((w.double() - w_zero.double()[:, None]) * w_scale.double()[:, None]).reshape(
        w.shape[0], x.shape[1], *kernel_size)
    if int(integer[k]):
        xq = torch.div(x, scale).round_().clamp_(low, high).double() * scale.double()
    else:
        xq = x.double()
    out = torch.nn.functional.conv2d(xq, weight, stride=stride, padding=padding)
    if bias is not None:
        out = out + bias.double()[:, None, None]
    return out.to(x.dtype)


if triton is not None:

    @triton.jit
    def _padded_codes_kernel(x_ptr, a_ptr, table_ptr, choice_ptr, step_ptr, integer_ptr,
                             offset_ptr, n, H, W, C, steps, PH: tl.constexpr, PW: tl.constexpr,
                             HAS_STEPS: tl.constexpr, BLOCK: tl.constexpr):
        """The int8 codes ``a = c − low − o_a`` of an NHWC ``x`` into ``[B, H + 2·PH, W + 2·PW,
        C]`` (``n`` elements), the border the code 0, ``a = z_a`` (the simulation pads its
        quantized input with exact zeros, on the grid or not); nothing where the chosen option
        runs in float math."""
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        if tl.load(integer_ptr + choice) != 0:
            o_a = tl.load(offset_ptr + choice).to(tl.float32)
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            c = offs % C
            pixel = offs // C
            wp = pixel % (W + 2 * PW)
            hp = (pixel // (W + 2 * PW)) % (H + 2 * PH)
            image = pixel // ((W + 2 * PW) * (H + 2 * PH))
            h, w = hp - PH, wp - PW
            inside = mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x = tl.load(x_ptr + ((image * H + h) * W + w) * C + c, mask=inside, other=0.0)
            code = tl.where(inside, grid_codes(x, scale, low, high), 0.0)  # (0 even off the
            tl.store(a_ptr + offs, (code - low - o_a).to(tl.int8), mask=mask)  # grid's range)

    @triton.jit
    def _weight_tile(w_ptr, offs_n, n_ok, stride_wn, k_idx, k_ok, w_zero, PACKED: tl.constexpr):
        """The weight codes at taps ``k_idx`` (``[BLOCK_C]``) of columns ``offs_n``: ``[BLOCK_C,
        BLOCK_N]`` int8 (packed: the nibble of byte ``k // 2`` that ``k % 2`` names, centered,
        ``− z_w``; off the matrix ``−z_w``, which meets activations of 0 or columns the store
        drops)."""
        mask = n_ok & k_ok[:, None]
        if PACKED:
            b = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k_idx // 2)[:, None], mask=mask,
                        other=0)
            nibble = ((b >> ((k_idx % 2) * 4).to(tl.uint8)[:, None]) & 15).to(tl.int32)
            w = (nibble - w_zero[None, :]).to(tl.int8)
        else:
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k_idx[:, None], mask=mask, other=0)
        return w

    @triton.jit
    def _conv_weights(w_ptr, offs_n, n_ok, N, stride_wn, kh, kw, c0, offs_c, offs_j, c_ok, C,
                      k_total, KB, w_zero, KH: tl.constexpr, KW: tl.constexpr,
                      PACKED: tl.constexpr, TAP_MAJOR: tl.constexpr, PAIRED: tl.constexpr,
                      ZERO: tl.constexpr):
        """The weight codes of channels ``c0 + offs_c`` of tap ``(kh, kw)``, ``[BLOCK_K,
        BLOCK_N]`` int8. ``PAIRED`` (packed tap-major bytes, C even): the tap's channels are
        whole bytes in a row, read as the packed GEMM reads its own (16 at a time, nibbles
        interleaved back into K order); channels past C meet activation codes of 0. Else a
        gather by channel (:func:`_weight_tile`)."""
        if PAIRED:
            w = _weight_block(w_ptr, offs_n, N, stride_wn, (kh * KW + kw) * C + c0, offs_c,
                              offs_j, k_total, KB, w_zero, True, ZERO)
        else:
            k_idx = _k_index(c0 + offs_c, kh, kw, C, KH, KW, TAP_MAJOR)
            w = _weight_tile(w_ptr, offs_n, n_ok, stride_wn, k_idx, c_ok, w_zero, PACKED)
        return w

    @triton.jit
    def _tap(image, ho, wo, m_ok, dh, dw, H, W, C):
        """Where a tap shifted by ``(dh, dw)`` reads each output pixel's input: whether inside
        the image (else a padded zero) and the offset of its channels in the NHWC input."""
        hi, wi = ho + dh, wo + dw
        inside = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        return inside, ((image * H + hi) * W + wi) * C

    @triton.jit
    def _step(i, n_cb, KW: tl.constexpr, BLOCK_K: tl.constexpr):
        """Step ``i`` of the reduction: its tap ``(kh, kw)`` and first channel. The taps run in
        one loop rather than unrolled (``tl.static_range``): unrolled, the nine taps of a 3×3
        kernel made nine pipelined loops in each branch, and Triton took 8-49 s to compile each
        tile for sm_90 on a 2-core CPU (207 s for the 8 tiles, for every flag combination;
        2 s a tile now); the SD 1.4 UNet's first real call lasted about 7 minutes on an H100."""
        tap = i // n_cb
        kh = tap // KW
        return kh, tap - kh * KW, (i - tap * n_cb) * BLOCK_K

    @triton.jit
    def _k_index(c, kh, kw, C, KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr):
        """Where channels ``c`` of tap ``(kh, kw)`` lie in a weight row."""
        if TAP_MAJOR:
            k = (kh * KW + kw) * C + c
        else:
            k = c * (KH * KW) + kh * KW + kw
        return k

    @triton.jit
    def _real_conv_kernel(x_ptr, a_ptr, w_ptr, out_ptr, table_ptr, choice_ptr, step_ptr,
                          integer_ptr, offset_ptr, w_sum_ptr, w_zero_ptr, w_scale_ptr, bias_ptr,
                          wf_ptr, B, H, W, C, N, H_OUT, W_OUT, steps, stride_wn, KB,
                          KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                          HAS_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                          PACKED: tl.constexpr, TAP_MAJOR: tl.constexpr, PRE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          ZERO: tl.constexpr = 2, SH: tl.constexpr = 1, SW: tl.constexpr = 1,
                          PAIRED: tl.constexpr = False, FLOAT_W: tl.constexpr = False):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
        offs_c = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, BLOCK_K // 2)  # PAIRED: byte j of a tap's block, channels 2j, 2j + 1
        m_total = B * H_OUT * W_OUT
        m_ok1 = offs_m < m_total
        image = offs_m // (H_OUT * W_OUT)
        ho = (offs_m // W_OUT) % H_OUT * SH  # the output pixel's first input row and column
        wo = offs_m % W_OUT * SW
        n_ok = offs_n[None, :] < N
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        if ZERO != 0:  # (real_gemm.zero_mode: 0 centered codes, 1 packed, 2 the full bracket)
            w_zero = tl.load(w_zero_ptr + offs_n, mask=offs_n < N, other=0)
        else:
            w_zero = tl.zeros([BLOCK_N], dtype=tl.int32)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        dtype = out_ptr.dtype.element_ty
        k_total = C * KH * KW
        n_cb = tl.cdiv(C, BLOCK_K)  # channel blocks of a tap
        if tl.load(integer_ptr + choice) != 0:
            o_a = tl.load(offset_ptr + choice).to(tl.float32)
            z_a = -low - o_a  # a padded tap's int8 value (its code is 0)
            acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
            for i in range(0, KH * KW * n_cb):  # one loop over (tap, channel block)
                kh, kw, c0 = _step(i, n_cb, KW, BLOCK_K)
                c_ok = (c0 + offs_c) < C
                real = m_ok1[:, None] & c_ok[None, :]  # taps of the reduction
                if PRE:  # the input's int8 codes, rounded and padded once (padded_codes)
                    padded = ((image * (H + 2 * PH) + ho + kh) * (W + 2 * PW) + wo + kw) * C
                    a = tl.load(a_ptr + padded[:, None] + c0 + offs_c[None, :], mask=real,
                                other=0)
                else:  # rounded here; a padded tap (outside the image) is the code of 0
                    inside, pixel = _tap(image, ho, wo, m_ok1, kh - PH, kw - PW, H, W, C)
                    load_ok = inside[:, None] & c_ok[None, :]
                    x = tl.load(x_ptr + pixel[:, None] + c0 + offs_c[None, :], mask=load_ok,
                                other=0.0)
                    code = grid_codes(x, scale, low, high)
                    a = tl.where(load_ok, code - low - o_a, tl.where(real, z_a, 0.0))
                    a = a.to(tl.int8)
                w = _conv_weights(w_ptr, offs_n, n_ok, N, stride_wn, kh, kw, c0, offs_c, offs_j,
                                  c_ok, C, k_total, KB, w_zero, KH, KW, PACKED, TAP_MAJOR, PAIRED,
                                  ZERO)
                acc_i += tl.dot(a, w, out_dtype=tl.int32)
                if ZERO == 2:  # the weights' zero point meets the codes' row sums
                    a_sum += tl.sum(a.to(tl.int32), axis=1)
            z_i = z_a.to(tl.int32)
            w_sum = tl.load(w_sum_ptr + offs_n, mask=offs_n < N, other=0)
            if ZERO == 2:
                exact = (acc_i - w_zero[None, :] * a_sum[:, None] - z_i * w_sum[None, :]
                         + k_total * z_i * w_zero[None, :])
            else:  # centered weights: Σ a·w − z_a·Σ_k w
                exact = acc_i - z_i * w_sum[None, :]
            out = exact.to(tl.float32) * (scale * w_scale[None, :])
        else:  # A16/A32: the unquantized input, zeros padded, times the dequantized weights
            acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for i in range(0, KH * KW * n_cb):
                kh, kw, c0 = _step(i, n_cb, KW, BLOCK_K)
                inside, pixel = _tap(image, ho, wo, m_ok1, kh - PH, kw - PW, H, W, C)
                c_ok = (c0 + offs_c) < C
                x = tl.load(x_ptr + pixel[:, None] + c0 + offs_c[None, :],
                            mask=inside[:, None] & c_ok[None, :], other=0.0)
                if FLOAT_W:  # the dequantized weights, stored in the codes' order (tap-major
                    # or the weight's own): from memory to the tensor cores, as cuDNN's bf16
                    k_idx = _k_index(c0 + offs_c, kh, kw, C, KH, KW, TAP_MAJOR)
                    weight = tl.load(wf_ptr + offs_n[None, :] * k_total + k_idx[:, None],
                                     mask=n_ok & c_ok[:, None], other=0.0)
                else:
                    w = _conv_weights(w_ptr, offs_n, n_ok, N, stride_wn, kh, kw, c0, offs_c,
                                      offs_j, c_ok, C, k_total, KB, w_zero, KH, KW, PACKED,
                                      TAP_MAJOR, PAIRED, ZERO)
                    weight = _float_weight(w, w_zero, w_scale, ZERO)
                if IEEE:
                    acc_f += tl.dot(x.to(tl.float32), weight, input_precision="ieee")
                else:
                    acc_f += tl.dot(x.to(dtype), weight.to(dtype))
            out = acc_f
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(dtype),
                 mask=m_ok1[:, None] & n_ok)

    @triton.jit
    def _persistent_conv_kernel(a_desc, w_desc, out_desc, table_ptr, choice_ptr, step_ptr,
                                offset_ptr, w_sum_ptr, w_zero_ptr, w_scale_ptr, bias_ptr, M, N,
                                C, HW, W_OUT, steps, HAS_STEPS: tl.constexpr,
                                HAS_BIAS: tl.constexpr, PACKED: tl.constexpr,
                                KH: tl.constexpr, KW: tl.constexpr, BB: tl.constexpr,
                                BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PROGRAMS: tl.constexpr):
        """The integer path alone of a stride-1 conv (an integer-only layer, centered tap-major
        weight codes, the input's padded codes), persistent and fed by TMA, as
        :func:`qlip.quant.real_gemm._persistent_linear_kernel` is for Linear layers. A tile's
        ``BLOCK_M`` output pixels are whole output rows, ``BB`` images of ``BH`` rows of
        ``BW = W_OUT`` pixels (:func:`conv_box`), so tap ``(kh, kw)``'s activations for the
        tile are one box of the padded codes ``[B, H + 2·PH, W + 2·PW, C]`` (``a_desc``), at
        image ``b0``, row ``h0 + kh``, column ``kw``, channels ``c0 …``: no gather, no masks
        (TMA fills past the edges with zeros; a channel past C holds the code value 0 and
        meets the next tap's weights with a product of 0). ``w_desc``: the ``[N, KH·KW·C]``
        codes (``PACKED``: their ``[N, KH·KW·C/2]`` bytes, centered in registers with the zero
        points at ``w_zero_ptr``, :func:`qlip.quant.real_gemm._tma_weights`); ``out_desc``: the
        ``[M, N]`` output, channels-last. Its products are :func:`_real_conv_kernel`'s, bit for
        bit (the same bracket, the same scaling)."""
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        z_a = (-low - tl.load(offset_ptr + choice).to(tl.float32)).to(tl.int32)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles = tiles_m * tl.cdiv(N, BLOCK_N)
        n_cb = tl.cdiv(C, BLOCK_K)
        k_steps = KH * KW * n_cb
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        tile = tl.program_id(0) - PROGRAMS
        i = k_steps - 1
        off_m = 0
        off_n = 0
        b0 = 0
        h0 = 0
        for _ in range(0, tl.cdiv(tiles - tl.program_id(0), PROGRAMS) * k_steps):
            i = tl.where(i == k_steps - 1, 0, i + 1)
            if i == 0:  # the next tile of this program (pixel tiles fastest)
                tile, off_m, off_n = _next_tile(tile, tiles_m, PROGRAMS, BLOCK_M, BLOCK_N)
                b0 = off_m // HW
                h0 = (off_m - b0 * HW) // W_OUT
            kh, kw, c0 = _step(i, n_cb, KW, BLOCK_K)
            a = a_desc.load([b0, h0 + kh, kw, c0]).reshape(BLOCK_M, BLOCK_K)
            w = _tma_weights(w_desc, w_zero_ptr, off_n, (kh * KW + kw) * C + c0, N, PACKED,
                             BLOCK_N, BLOCK_K)
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            if i == k_steps - 1:
                _persistent_epilogue(acc, out_desc, off_m, off_n, N, z_a, scale, w_sum_ptr,
                                     w_scale_ptr, bias_ptr, HAS_BIAS, BLOCK_N)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)

    _CONV_KEY = ["B", "H", "W", "C", "N", "H_OUT", "W_OUT", "KH", "KW", "IEEE", "TAP_MAJOR",
                 "PRE", "ZERO", "FLOAT_W"]  # (the output's size tells a stride from another)
    _conv_tuned = autotuned(_real_conv_kernel, TILES, _CONV_KEY)
    _packed_conv_tuned = autotuned(_real_conv_kernel, TILES, _CONV_KEY)


def real_conv2d(x, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias,
                kernel_size: tuple[int, int], padding: tuple[int, int],
                tap_major: bool = False, stride: tuple[int, int] = (1, 1),
                integer_only: bool = False, w_float: torch.Tensor | None = None) -> torch.Tensor:
    """``x [B, C, H, W]`` through the KH×KW convolution of ``stride``: one launch, integer or float
    math by the option ``choice`` names; ``w`` the ``[N, C·KH·KW]`` codes (int8, or packed uint8),
    in the weight's own order or tap-major (``tap_major``, :func:`tap_major_rows`).
    Returns ``[B, N, H_out, W_out]`` in x's dtype, channels-last in memory. Under
    ``torch.compile`` the launch is the custom operator ``torch.ops.qlip.real_conv2d``, which the
    compiled graph keeps (as :func:`qlip.quant.real_gemm.real_linear`, ``integer_only`` and
    ``w_float`` too: here the dequantized weights in the codes' order, ``[N, K]``)."""
    k_total = x.shape[1] * kernel_size[0] * kernel_size[1]
    if k_total > MAX_K:
        raise ValueError(f"integer execution accumulates K ≤ {MAX_K} exactly; got K = {k_total}")
    packed = w.dtype == torch.uint8
    if w.shape[1] != ((k_total + 1) // 2 if packed else k_total):
        raise ValueError(f"weights {tuple(w.shape)} do not hold K = {k_total} codes a row")
    if any(s < 1 for s in stride) or len(stride) != 2:
        raise ValueError(f"stride must be two positive integers; got {tuple(stride)}")
    step = step if steps else choice
    shape = (list(kernel_size), list(padding), tap_major, list(stride))
    if not torch.compiler.is_compiling():
        return _launch_conv2d(x, None, table, choice, step, steps, integer, offset, w, w_sum,
                              w_zero, w_scale, bias, *shape, w_float=w_float,
                              integer_only=integer_only)
    a = (real_gemm.graph_codes(x.permute(0, 2, 3, 1), table, choice, step, steps, offset,
                               tuple(padding)) if real_gemm.codes_in_graph() else None)
    read = a is None or not integer_only  # (not read: the codes alone, real_gemm.real_linear)
    return torch.ops.qlip.real_conv2d(x if read else None, a, table, choice, step, steps,
                                      integer, offset, w, w_sum, w_zero, w_scale, bias, *shape,
                                      w_float, integer_only)


# Integer-only stride-1 convs (every option at most 8 bits, centered tap-major codes, int8 or
# packed) through the persistent TMA kernel (:func:`_persistent_conv_kernel`), as real_gemm.PERSISTENT does for
# Linear layers: None (the default) while a CUDA graph is captured (each launch encodes three TMA
# descriptors on the host, which a graph does once), True always, False never.
PERSISTENT: bool | None = None
# Its tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by N, autotune being impossible inside a
# capture: the fastest of six on each of the SD 1.4 step's four 3×3 conv shapes at batch 8 on an
# H100 (twentieth session's sweep, replayed from a CUDA graph: N 320 and 640 0.114 and 0.081 ms
# with the narrow tile, N 1280 0.076 and 0.228 ms with the wide one; cuDNN's bf16 0.126, 0.119,
# 0.100 and 0.378 ms).
PERSISTENT_CONV_WIDE = (128, 256, 128, 8, 3)
PERSISTENT_CONV_NARROW = (128, 128, 128, 8, 4)


def conv_box(h_out: int, w_out: int, block_m: int) -> tuple[int, int] | None:
    """``(BB, BH)``: a tile of ``block_m`` output pixels as whole output rows, ``BB`` images of
    ``BH`` rows of ``w_out`` pixels (one TMA box of the padded codes per tap, each dimension at
    most 256), or None where the image's rows do not tile ``block_m`` so."""
    hw = h_out * w_out
    if w_out > 256:
        return None
    if hw >= block_m:
        rows = block_m // w_out
        return (1, rows) if block_m % w_out == 0 and h_out % rows == 0 else None
    images = block_m // hw
    return (images, h_out) if block_m % hw == 0 and images <= 256 and h_out <= 256 else None


def persistent_conv_tile(n: int) -> tuple[int, int, int, int, int]:
    """The persistent conv kernel's tile for ``n`` output channels (``real_gemm.FORCE_TILE``
    where set)."""
    if real_gemm.FORCE_TILE is not None:
        return real_gemm.FORCE_TILE
    return PERSISTENT_CONV_WIDE if n >= 1280 else PERSISTENT_CONV_NARROW


def persistent_conv_ok(a: torch.Tensor, w: torch.Tensor, w_zero, out: torch.Tensor,
                       tap_major: bool, stride, block_m: int) -> bool:
    """Whether :data:`PERSISTENT` can take this conv (``real_gemm.persistent_wanted``): the
    padded int8 codes ``a`` ``[B, Hp, Wp, C]``, tap-major weight codes (packed: C a multiple of
    32, for 16-byte rows of bytes), stride 1, output rows that tile ``block_m``
    (:func:`conv_box`), and rows TMA can address (16-byte aligned starts and strides)."""
    return (real_gemm.persistent_wanted(PERSISTENT, w, w_zero, out)
            and a.dtype == torch.int8 and tap_major
            and tuple(stride) == (1, 1) and w.stride(0) * w.element_size() % 16 == 0
            and conv_box(out.shape[1], out.shape[2], block_m) is not None
            and a.is_contiguous() and w.is_contiguous() and out.is_contiguous()
            and all(t.data_ptr() % 16 == 0 for t in (a, w, out))
            and a.shape[3] % 16 == 0 and out.shape[3] * out.element_size() % 16 == 0)


def _launch_persistent_conv(a, w, out, table, choice, step, steps, offset, w_sum, w_zero,
                            w_scale, bias, kernel_size, tile) -> None:
    """``out [B, H_out, W_out, N]`` (channels-last) ``=`` the integer product of the padded
    codes ``a`` and the tap-major codes ``w``, scaled, through :func:`_persistent_conv_kernel`
    (``tile``: :func:`persistent_conv_tile`'s)."""
    TensorDescriptor = real_gemm.TensorDescriptor
    b, h_out, w_out, n = out.shape
    block_m, block_n, block_k, warps, stages = tile
    bb, bh = conv_box(h_out, w_out, block_m)
    m = b * h_out * w_out
    out2 = out.view(m, n)
    packed = w.dtype == torch.uint8
    descs = (TensorDescriptor.from_tensor(a, [bb, bh, w_out, block_k]),
             TensorDescriptor.from_tensor(w, [block_n, block_k // 2 if packed else block_k]),
             TensorDescriptor.from_tensor(out2, [block_m, block_n]))
    programs = real_gemm.persistent_programs(out.device)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    _persistent_conv_kernel[(min(programs, tiles),)](
        *descs, table, choice, step, offset, w_sum, w_zero if w_zero is not None else w_sum,
        w_scale, bias if bias is not None else w_scale, m, n, a.shape[3], h_out * w_out, w_out,
        steps, HAS_STEPS=bool(steps), HAS_BIAS=bias is not None, PACKED=packed,
        KH=kernel_size[0], KW=kernel_size[1],
        BB=bb, BH=bh, BW=w_out, PROGRAMS=programs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, **real_gemm.tile_options(warps, stages))


CODES_BLOCK = 1024  # elements a program of the padded codes kernel writes


def padded_codes(xl: torch.Tensor, table, choice, step, steps: int, integer, offset,
                 padding: tuple[int, int]) -> torch.Tensor:
    """The int8 codes of an NHWC ``xl`` ``[B, H, W, C]`` at the option ``choice`` names, padded:
    ``[B, H + 2·PH, W + 2·PW, C]``, the border holding the code 0 (``a = z_a``). One launch;
    left unwritten where the option runs in float math (the conv then reads ``xl``)."""
    b, h, w, c = xl.shape
    ph, pw = padding
    a = torch.empty(b, h + 2 * ph, w + 2 * pw, c, device=xl.device, dtype=torch.int8)
    n = a.numel()
    if n:
        _padded_codes_kernel[(triton.cdiv(n, CODES_BLOCK),)](
            xl, a, table, choice, step, integer, offset, n, h, w, c, steps, PH=ph, PW=pw,
            HAS_STEPS=bool(steps), BLOCK=CODES_BLOCK)
    return a


def _input_shape(x: torch.Tensor | None, a: torch.Tensor | None,
                 padding) -> tuple[int, int, int, int]:
    """``(B, C, H, W)`` of the input: x's, or (x None) what its padded NHWC codes ``a`` tell."""
    if x is not None:
        return tuple(x.shape)
    b, hp, wp, c = a.shape
    return b, c, hp - 2 * padding[0], wp - 2 * padding[1]


def _output_shape(x_shape, n: int, kernel_size, padding, stride) -> tuple[int, int, int, int]:
    """``[B, H_out, W_out, N]``: the output as it lies in memory (channels-last), for an input
    of ``x_shape`` ``(B, C, H, W)``."""
    b, _, h, width = x_shape
    return (b, (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1,
            (width + 2 * padding[1] - kernel_size[1]) // stride[1] + 1, n)


def _launch_conv2d(x: torch.Tensor | None, a: torch.Tensor | None, table: torch.Tensor,
                   choice: torch.Tensor, step: torch.Tensor, steps: int, integer: torch.Tensor,
                   offset: torch.Tensor, w: torch.Tensor, w_sum: torch.Tensor,
                   w_zero: torch.Tensor | None, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   kernel_size: list[int], padding: list[int], tap_major: bool,
                   stride: list[int],
                   w_float: torch.Tensor | None = None,
                   integer_only: bool = False) -> torch.Tensor:
    """``a``: x's padded NHWC int8 codes (``real_gemm.graph_codes``, in a compiled graph), or
    None: the padded codes kernel writes them here (where ``real_gemm.PREQUANTIZE``).
    ``x`` None (with ``a``): the codes are all the kernel reads (no float option); the input's
    size comes from them and the output's dtype from the table. ``w_float``, ``integer_only``:
    see :func:`real_conv2d` (an integer-only stride-1 conv may take the persistent kernel,
    :data:`PERSISTENT`)."""
    if x is None and a is None:
        raise ValueError("a layer given no input (x None) needs its codes (a)")
    dtype = x.dtype if x is not None else table.dtype
    b, c, h, width = x_shape = _input_shape(x, a, padding)
    kh, kw = kernel_size
    real_gemm.check_float_weights(w_float, w, c * kh * kw, dtype)
    if real_gemm.unpack_wanted(w, w_zero):  # centered int8 codes for this call, in the same
        w, w_zero = real_gemm.unpack_centered(w, w_zero, c * kh * kw), None  # (tap) order
    _, h_out, w_out, n = shape = _output_shape(x_shape, w.shape[0], kernel_size, padding, stride)
    out = torch.empty(shape, device=w.device, dtype=dtype)
    # [B, H, W, C] (a view for a channels-last x; x None: the kernel's x pointer, never read)
    xl = x.permute(0, 2, 3, 1).contiguous() if x is not None else out
    table = table.contiguous()
    if a is not None:
        a = a.contiguous()  # [B, H + 2·PH, W + 2·PW, C], as the kernel reads it
    elif real_gemm.PREQUANTIZE:
        a = padded_codes(xl, table, choice, step, steps, integer, offset, padding)
    else:
        a = xl
    pre = a is not xl
    if pre and (integer_only or x is None):
        tile = persistent_conv_tile(n)
        if persistent_conv_ok(a, w, w_zero, out, tap_major, stride, tile[0]):
            _launch_persistent_conv(a, w, out, table, choice, step, steps, offset, w_sum,
                                    w_zero, w_scale, bias, kernel_size, tile)
            return out.permute(0, 3, 1, 2)
    operands = (xl, a, w, out, table, choice, step, integer, offset, w_sum,
                w_scale if w_zero is None else w_zero, w_scale,
                bias if bias is not None else w_scale, w_float if w_float is not None else out,
                b, h, width, c, n, h_out, w_out, steps, w.stride(0), (c * kh * kw + 1) // 2)
    packed = w.dtype == torch.uint8
    flags = dict(KH=kh, KW=kw, PH=padding[0], PW=padding[1], SH=stride[0], SW=stride[1],
                 HAS_STEPS=bool(steps), HAS_BIAS=bias is not None,
                 IEEE=dtype == torch.float32, PACKED=packed,
                 TAP_MAJOR=tap_major, PRE=pre, ZERO=zero_mode(w, w_zero),
                 PAIRED=packed and tap_major and c % 2 == 0, FLOAT_W=w_float is not None)
    if packed:
        launch(_real_conv_kernel, _packed_conv_tuned, TILES, b * h_out * w_out, n,
               operands, flags)
    else:
        launch(_real_conv_kernel, _conv_tuned, TILES, b * h_out * w_out, n, operands, flags)
    return out.permute(0, 3, 1, 2)


# the operator, for compiled graphs; eager calls launch directly (the dispatcher's Python
# custom-op path adds host time to every call of a host-bound eager step)
_real_conv2d_op = torch.library.custom_op("qlip::real_conv2d", mutates_args=())(_launch_conv2d)


@_real_conv2d_op.register_fake
def _(x, a, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias,
      kernel_size, padding, tap_major, stride, w_float=None, integer_only=False):
    shape = _output_shape(_input_shape(x, a, padding), w.shape[0], kernel_size, padding, stride)
    return table.new_empty(shape, dtype=x.dtype if x is not None else table.dtype).permute(
        0, 3, 1, 2)
