"""Real low-precision execution of a quantized Linear layer whose activation bits are data: one
Triton GEMM that reads the layer's chosen option on the device and runs

- **integer math** for options of at most 8 bits: the activations are rounded to their integer
  codes in registers, multiplied with the weights' integer codes on int8 tensor cores into int32,
  and the zero points are handled exactly by row and column sums;
- **16-bit float math** for wider options (A16, A32): the unquantized activations times the
  dequantized weights, as a bf16 layer runs.

The branch is on a scalar read from device memory, uniform over the whole launch: no host sync,
one compiled kernel serves every bit assignment, and QLIP's per-step choice needs no
recompilation.

**Two launches a layer.** An element-wise kernel first rounds the layer's input to its int8
codes, once per call (:func:`int8_codes`; it writes nothing where the option runs in float
math); the GEMM then reads those bytes. Rounding inside the GEMM's tiles instead
(``PREQUANTIZE = False``, the only way before the thirteenth session) repeats the exact division
for every tile of output channels, N / BLOCK_N times over: by count, more CUDA-core work than
the int8 MMA it feeds. That real SD 1.4 step ran 5.7× slower than bf16 on an H200; how much of it
the rounding took is not measured yet (``benchmarks/real_layer_speed.py`` times both ways).

**The integer path, exactly.** With the activation code ``c = clamp(round(x/Δ), −z, 2^b−1−z)``
(the simulation's ``x̂ = c·Δ``) held as int8 ``a = c + z − o_a`` and the weight code ``w_c``
(the simulation's ``ŵ = (w_c − z_w)·s_w``) as int8 ``w = w_c − o_w``, where the offsets are 128
for 8-bit codes and 0 below:

    Σ_k x̂_k ŵ_k = Δ·s_w · [Σ a·w − z'_w·Σ_k a − z_a·Σ_k w + K·z_a·z'_w],   z'_w = z_w − o_w

with ``z_a = a − c = z − o_a``. The bracket is an integer, computed in int32 without overflow for
K ≤ 32,768 (every term is at most 128·128·K). So the layer's output is the exact product of the simulation's quantized
operands, rounded once to fp32 (the integer to fp32, then the scale): closer to the exact value
than the simulation's own floating-point GEMM. The activation codes are the simulation's,
bit for bit: the quotient is rounded to x's dtype as ``torch.div`` does, then rounded half to
even. The tests check both against a float64 computation.

**Centered weights: no row sums.** Weight codes of at most 7 bits are held centered,
``w = w_c − z_w`` (within ±127, so int8), and ``z'_w = 0``: the bracket is ``Σ a·w − z_a·Σ_k w``,
its last term a constant per output channel. The activations' row sums ``Σ_k a``, which the
int8 tile would otherwise reduce on the CUDA cores at every step of K, drop out, and the tile
feeds the tensor cores only. 8-bit weight codes (``w_c − z_w`` up to ±255) keep the full
bracket (:func:`zero_mode`).

**Packed 4-bit weights.** Weight codes of at most 4 bits may come packed two per byte along K
(:func:`pack_rows`: code ``2j`` of a row in the low nibble of byte ``j``, ``2j + 1`` in the high
one; for an even K that is exactly the flat packing of :mod:`qlip.quant.packing`, so a packed
layer's own bytes serve, viewed ``[N, K/2]``). By default (:data:`UNPACK_PACKED`) a launch first
unpacks the layer's bytes (:func:`unpack_centered`, one kernel) into centered int8 codes that live
for that call, and runs the unpacked kernel on them: no int8 copy of the weights stays in memory.
With the switch off, the kernel interleaves each tile's low and high nibbles back into K order
in registers (``tl.interleave``) and centers them there (``− z_w``), so the activation codes are
read contiguously, as for int8 weights: the same integer bracket, the unpacking repeated in
every output tile.

Written by hand: PyTorch's int8 GEMM (``torch._int_mm``) takes integer inputs only, so the
quantization, the zero-point sums and the choice between integer and float math would be
separate launches with a host-side branch; no library fuses them.
"""

from __future__ import annotations

import torch

from .fused_quantize import fixed_tile, triton, tuner

TensorDescriptor = None  # host-side TMA descriptors, where this Triton has them (3.4 on)
if triton is not None:
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        pass

    from .fused_quantize import grid_codes, load_grid

MAX_K = 32768  # int32 accumulation stays exact up to this reduction length

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) that triton.autotune times once per (M, N, K)
# on the GPU, keeping the fastest. One fixed 64×64×32 tile ran the SD 1.4 step's Linear layers
# 2.2× slower than the simulation's bf16 GEMMs on an H200 (the eighth session); int8 tensor cores
# want a longer K per tile. Under the interpreter (no timing) the kernel runs with TILES[0].
# The list follows benchmarks/real_tile_sweep.py on an H100 (the seventeenth session, 10 of the
# SD 1.4 step's heaviest shapes at batch 8, docs/results/speed/seventeenth_session/): every
# shape's fastest tile is in it. 128×256×128 (3 stages) and 128×128×128 (4 stages) won 6 of
# the 10 shapes, by up to 19% (the 3×3 conv at 1280 channels); 128×128×64 and 32×64×128 won
# none and left.
TILES = [(64, 64, 32, 4, 2), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
         (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3)]


def int8_offsets(options: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per option: whether it runs in integer math (``[K]`` int32, 1 for ≤ 8 bits) and the
    offset that puts its codes in int8 (``[K]`` int32: 128 for 8 bits, 0 below)."""
    integer = torch.tensor([int(b <= 8) for b in options], dtype=torch.int32)
    offset = torch.tensor([128 if b == 8 else 0 for b in options], dtype=torch.int32)
    return integer, offset


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``codes [N, K]`` (values < 16) -> ``[N, ceil(K/2)]`` uint8, two codes a byte along K (code
    ``2j`` in the low nibble of byte ``j``; an odd K pads a 0 nibble)."""
    codes = codes.to(torch.uint8)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes up to {int(codes.max())} do not fit in 4 bits")
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_rows(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: the ``[N, k]`` codes (int32)."""
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    return pairs[:, :k].to(torch.int32)


def weight_operands(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    packed: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The weight side, once per layer, for ``codes`` ``[N, K]`` in ``[0, 2^bits − 1]`` with
    per-output-channel ``scale``/``zero``: ``(w, w_sum, w_zero, w_scale)``, the scales ``[N]``
    fp32 and, by :func:`zero_mode`,

    - at most 7 bits: ``w = w_c − z_w`` centered, int8 ``[N, K]``; ``w_zero`` None; ``w_sum`` its
      row sums ``[N]`` (int32);
    - ``packed`` (the uint8 ``[N, ceil(K/2)]`` of :func:`pack_rows`, at most 4 bits): ``w`` those
      bytes; ``w_zero = z_w`` ``[N]`` (int32), which the kernel subtracts from each nibble;
      ``w_sum`` the centered codes' row sums;
    - 8 bits: ``w = w_c − o_w`` (int8), ``w_zero = z_w − o_w``, ``w_sum`` the row sums of ``w``:
      the kernel adds the zero point's terms with the activations' row sums.

    A zero point whose centered codes leave int8 (outside the codes' range) falls back to the
    8-bit form, unpacked."""
    if bits > 8:
        raise ValueError(f"integer execution needs weights of at most 8 bits; got W{bits}")
    if packed is not None and (bits > 4 or packed.dtype != torch.uint8
                               or tuple(packed.shape) != (codes.shape[0], (codes.shape[1] + 1) // 2)):
        raise ValueError(f"packed weights are [N, ceil(K/2)] uint8 codes of at most 4 bits; got "
                         f"{tuple(packed.shape)} {packed.dtype} for W{bits} codes "
                         f"{tuple(codes.shape)}")
    scale = scale.reshape(-1).float().contiguous()
    zero = zero.reshape(-1).round().to(torch.int32)
    centered = codes.to(torch.int32) - zero[:, None]
    if bits <= 7 and centered.numel() and int(centered.abs().max()) <= 127:  # (once, on setup)
        w_sum = centered.sum(1)
        if packed is not None:
            return packed.contiguous(), w_sum, zero.contiguous(), scale
        return centered.to(torch.int8).contiguous(), w_sum, None, scale
    offset = 128 if bits == 8 else 0
    w = (codes.to(torch.int32) - offset).to(torch.int8).contiguous()
    return w, w.to(torch.int32).sum(1), (zero - offset).contiguous(), scale


def zero_mode(w: torch.Tensor, w_zero: torch.Tensor | None) -> int:
    """How a kernel treats the weights' zero points (:func:`weight_operands`): 0, the codes come
    centered; 1, packed nibbles it centers in registers; 2, the full bracket, with the
    activations' row sums."""
    if w_zero is None:
        return 0
    return 1 if w.dtype == torch.uint8 else 2


def centered_codes(w: torch.Tensor, w_zero: torch.Tensor | None) -> torch.Tensor:
    """The int8 weight operands of :func:`weight_operands` as centered codes ``w_c − z_w``
    (int32): ``w`` itself where it comes centered, minus its zero points where not."""
    codes = w.to(torch.int32)
    return codes if w_zero is None else codes - w_zero.to(torch.int32)[:, None]


def float_weights(w: torch.Tensor, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weights ``(w_c − z_w)·s_w`` ``[N, K]`` in ``dtype``, from the int8
    operands of :func:`weight_operands` (in their order: a conv's tap-major), as the kernels'
    float math computes them in registers (the integer codes in fp32, times the fp32 scale,
    rounded once to ``dtype``), so that the same values come from memory instead.

    Kept by a layer with float options beside its integer ones (QLIP's A16 beside A8): a
    kernel given them (``w_float``) reads them as a bf16 layer reads its weights, straight
    into the tensor cores, where otherwise every tile of output rows dequantizes its block of
    codes again on the CUDA cores. On an H100 a model whose every layer ran that float branch
    took 41.4 ms a step against bf16's 19.3 ms (the eighteenth session). Packed codes keep no
    such copy (their point is the memory)."""
    if w.dtype == torch.uint8:
        raise ValueError("packed codes keep no float copy of their weights")
    codes = centered_codes(w, w_zero)
    return (codes.float() * w_scale.float()[:, None]).to(dtype).contiguous()


def check_float_weights(w_float: torch.Tensor | None, w: torch.Tensor, k: int,
                        dtype: torch.dtype) -> None:
    """``w_float``, where given, is the ``[N, K]`` contiguous copy :func:`float_weights` makes, in
    the input's dtype, on its device."""
    if w_float is None:
        return
    want = (w.shape[0], k)
    if (tuple(w_float.shape) != want or w_float.dtype != dtype or not w_float.is_contiguous()
            or w_float.device != w.device):
        raise ValueError(f"w_float must be the contiguous {want} {dtype} weights of "
                         f"real_gemm.float_weights on {w.device}; got {tuple(w_float.shape)} "
                         f"{w_float.dtype} on {w_float.device}")

def reference(x, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias):
    """What the kernel computes, in PyTorch (float64 for the integer path's bracket): ``x``
    ``[M, K]``; ``table`` ``[K·T, 3]`` in x's dtype; ``choice``/``step`` ``[1]`` long."""
    if w.dtype == torch.uint8:  # packed 4-bit codes
        w = unpack_rows(w, x.shape[-1])
    if w_zero is None:  # centered codes
        w_zero = w.new_zeros(w.shape[0], dtype=torch.int32)
    k = int(choice.reshape(-1)[0])
    row = k * steps + int(step.reshape(-1)[0]) if steps else k
    scale, low, high = (table[row, i] for i in range(3))
    if int(integer[k]):  # the simulation's integer codes times the weights' codes, exactly
        c = torch.div(x, scale).round_().clamp_(low, high).double()
        out = (c @ (w.double() - w_zero.double()[:, None]).T) * scale.double() * w_scale.double()
    else:
        weight = (w.double() - w_zero.double()[:, None]) * w_scale.double()[:, None]
        out = x.double() @ weight.T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


if triton is not None:

    @triton.jit
    def _int8_codes_kernel(x_ptr, a_ptr, table_ptr, choice_ptr, step_ptr, integer_ptr,
                           offset_ptr, n, steps, HAS_STEPS: tl.constexpr, BLOCK: tl.constexpr):
        """The int8 activation codes ``a = c − low − o_a`` of a dense ``x`` (``n`` elements), once
        per layer call, where the chosen option runs in integer math (else nothing: the GEMM
        then reads x itself)."""
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        if tl.load(integer_ptr + choice) != 0:
            o_a = tl.load(offset_ptr + choice).to(tl.float32)
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            c = grid_codes(x, scale, low, high)
            tl.store(a_ptr + offs, (c - low - o_a).to(tl.int8), mask=mask)

    @triton.jit
    def _codes_at(x_ptr, a_ptr, offs_m, stride_xm, offs_k, m_ok, K, scale, low, high, o_a,
                  PRE: tl.constexpr):
        """The int8 activation codes ``a = c − low − o_a`` of x's columns ``offs_k`` (0 off the
        matrix): read from ``a_ptr`` (``[M, K]``, written by :func:`_int8_codes_kernel`) where
        ``PRE``, else rounded here from x."""
        ok = m_ok & (offs_k[None, :] < K)
        if PRE:
            a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=ok, other=0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0)
            c = grid_codes(x, scale, low, high)
            a = tl.where(ok, c - low - o_a, 0.0).to(tl.int8)
        return a

    @triton.jit
    def _weight_block(w_ptr, offs_n, N, stride_wn, start, offs_k, offs_j, K, KB, w_zero,
                      PACKED: tl.constexpr, ZERO: tl.constexpr):
        """The weight codes at K offsets ``start + offs_k`` of columns ``offs_n``,
        ``[BLOCK_K, BLOCK_N]`` int8: as stored, or (packed) the nibbles of bytes
        ``start/2 + offs_j`` put back in K order and centered (``− z_w``). Off the matrix a
        packed block holds ``−z_w``, not 0: it meets activations of 0 there (K past its end),
        or lands in columns the store drops (N past its end)."""
        if PACKED:  # bytes [BLOCK_N, BLOCK_K/2]; interleaved: low nibble at 2j, high at 2j + 1
            j_ok = (start // 2 + offs_j) < KB  # (KB = ceil(K/2), an argument: a multiple of
            # 16 there lets the launcher specialise it and the bytes load 16 at a time)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + start // 2 + offs_j[None, :],
                        mask=(offs_n[:, None] < N) & j_ok[None, :], other=0)
            w = tl.trans(tl.interleave(b & 15, b >> 4)).to(tl.int32)
            if ZERO != 0:
                w = w - w_zero[None, :]
            w = w.to(tl.int8)
        else:
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + start + offs_k[:, None],
                        mask=(offs_n[None, :] < N) & ((start + offs_k) < K)[:, None], other=0)
        return w

    @triton.jit
    def _float_weight(w, w_zero, w_scale, ZERO: tl.constexpr):
        """A block of :func:`_weight_block` dequantized (fp32): its codes, minus the zero point
        where they are not centered yet, times the scales."""
        if ZERO == 2:
            weight = (w.to(tl.int32) - w_zero[None, :]).to(tl.float32) * w_scale[None, :]
        else:
            weight = w.to(tl.float32) * w_scale[None, :]
        return weight

    @triton.jit
    def _real_linear_kernel(x_ptr, a_ptr, w_ptr, out_ptr, table_ptr, choice_ptr, step_ptr,
                            integer_ptr, offset_ptr, w_sum_ptr, w_zero_ptr, w_scale_ptr, bias_ptr,
                            wf_ptr, M, N, K, KB, steps, stride_xm, stride_wn, stride_om,
                            stride_fn,
                            HAS_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PACKED: tl.constexpr = False, PRE: tl.constexpr = False,
                            ZERO: tl.constexpr = 2, FLOAT_W: tl.constexpr = False):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, BLOCK_K // 2)  # packed: byte j of a tile holds K offsets 2j, 2j + 1
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        if ZERO != 0:
            w_zero = tl.load(w_zero_ptr + offs_n, mask=offs_n < N, other=0)
        else:
            w_zero = tl.zeros([BLOCK_N], dtype=tl.int32)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        dtype = out_ptr.dtype.element_ty
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[None, :] < N
        if tl.load(integer_ptr + choice) != 0:
            # a = c − low − o_a: the codes in int8 (c − low ∈ [0, 2^b − 1]); x̂ = c·Δ = (a − z_a)·Δ
            o_a = tl.load(offset_ptr + choice).to(tl.float32)
            acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)  # (a name of its own: Triton
            # wants every name both branches assign to have one type)
            a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
            for start in range(0, K, BLOCK_K):
                a = _codes_at(x_ptr, a_ptr, offs_m, stride_xm, start + offs_k, m_ok, K, scale,
                              low, high, o_a, PRE)
                w = _weight_block(w_ptr, offs_n, N, stride_wn, start, offs_k, offs_j, K, KB,
                                  w_zero, PACKED, ZERO)
                acc_i += tl.dot(a, w, out_dtype=tl.int32)
                if ZERO == 2:  # the weights' zero point meets the activations' row sums
                    a_sum += tl.sum(a.to(tl.int32), axis=1)
            z_a = (-low - o_a).to(tl.int32)  # a − c: −low = z is an integer
            w_sum = tl.load(w_sum_ptr + offs_n, mask=offs_n < N, other=0)
            if ZERO == 2:
                exact = (acc_i - w_zero[None, :] * a_sum[:, None] - z_a * w_sum[None, :]
                         + K * z_a * w_zero[None, :])
            else:  # centered weights: Σ a·w − z_a·Σ_k w
                exact = acc_i - z_a * w_sum[None, :]
            out = exact.to(tl.float32) * (scale * w_scale[None, :])
        else:  # A16/A32: the layer in float math, x as it is
            acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + start + offs_k[None, :],
                            mask=m_ok & ((start + offs_k) < K)[None, :], other=0.0)
                if FLOAT_W:  # the dequantized weights, stored (float_weights): from memory
                    # to the tensor cores as a bf16 layer's
                    weight = tl.load(wf_ptr + offs_n[None, :] * stride_fn + start + offs_k[:, None],
                                     mask=n_ok & ((start + offs_k) < K)[:, None], other=0.0)
                else:
                    w = _weight_block(w_ptr, offs_n, N, stride_wn, start, offs_k, offs_j, K, KB,
                                      w_zero, PACKED, ZERO)
                    weight = _float_weight(w, w_zero, w_scale, ZERO)
                if IEEE:  # fp32 layers: TF32 would round the inputs
                    acc_f += tl.dot(x.to(tl.float32), weight, input_precision="ieee")
                else:
                    acc_f += tl.dot(x.to(dtype), weight.to(dtype))
            out = acc_f
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(dtype),
                 mask=m_ok & n_ok)


    @triton.jit
    def _tma_weights(w_desc, w_zero_ptr, off_n, k0, N, PACKED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The ``[BLOCK_N, BLOCK_K]`` int8 weight codes at column ``off_n``, K offset ``k0``,
        loaded by TMA: centered codes as stored, or (``PACKED``) the bytes ``k0/2 …`` of packed
        codes, their nibbles put back in K order and centered in registers (``− z_w``)."""
        if PACKED:
            b = w_desc.load([off_n, k0 // 2])
            offs_n = off_n + tl.arange(0, BLOCK_N)
            z_w = tl.load(w_zero_ptr + offs_n, mask=offs_n < N, other=0)
            w = (tl.interleave(b & 15, b >> 4).to(tl.int32) - z_w[:, None]).to(tl.int8)
        else:
            w = w_desc.load([off_n, k0])
        return w

    @triton.jit
    def _next_tile(tile, tiles_m, PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """A persistent program's next output tile after ``tile`` (row tiles fastest): its index
        and its first row and column."""
        tile += PROGRAMS
        return tile, (tile % tiles_m) * BLOCK_M, (tile // tiles_m) * BLOCK_N

    @triton.jit
    def _persistent_epilogue(acc, out_desc, off_m, off_n, N, z_a, scale, w_sum_ptr, w_scale_ptr,
                             bias_ptr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        """A persistent kernel's tile epilogue: ``Σ a·w − z_a·Σ_k w`` (centered weights), scaled,
        the bias added, stored by TMA at ``(off_m, off_n)``."""
        offs_n = off_n + tl.arange(0, BLOCK_N)
        w_sum = tl.load(w_sum_ptr + offs_n, mask=offs_n < N, other=0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = (acc - z_a * w_sum[None, :]).to(tl.float32) * (scale * w_scale[None, :])
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], out.to(out_desc.dtype))

    @triton.jit
    def _persistent_linear_kernel(a_desc, w_desc, out_desc, table_ptr, choice_ptr, step_ptr,
                                  offset_ptr, w_sum_ptr, w_zero_ptr, w_scale_ptr, bias_ptr, M, N,
                                  K, steps, HAS_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  PROGRAMS: tl.constexpr):
        """The integer path alone (a layer whose every option is integer math, centered weight
        codes, or packed ones: ``PACKED``, ``w_desc`` over their ``[N, ceil(K/2)]`` bytes, the
        zero points at ``w_zero_ptr``), persistent: ``PROGRAMS`` programs walk the output
        tiles, each tile's codes and weights loaded by TMA (``a_desc`` ``[M, K]``, ``w_desc``
        ``[N, K]``, int8; zeros past the edges, so no masks: a packed byte past K meets
        activations of 0), its output stored by TMA (``out_desc``). One loop over tiles
        and K blocks: the software pipeline issues the next tile's loads before this tile's
        epilogue, which the one-tile-a-program kernel cannot overlap. Its products are
        :func:`_real_linear_kernel`'s, bit for bit (the same bracket, the same scaling)."""
        choice, scale, low, high = load_grid(table_ptr, choice_ptr, step_ptr, steps, HAS_STEPS)
        z_a = (-low - tl.load(offset_ptr + choice).to(tl.float32)).to(tl.int32)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles = tiles_m * tl.cdiv(N, BLOCK_N)
        k_blocks = tl.cdiv(K, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        tile = tl.program_id(0) - PROGRAMS
        k_block = k_blocks - 1
        off_m = 0
        off_n = 0
        for _ in range(0, tl.cdiv(tiles - tl.program_id(0), PROGRAMS) * k_blocks):
            k_block = tl.where(k_block == k_blocks - 1, 0, k_block + 1)
            if k_block == 0:
                tile, off_m, off_n = _next_tile(tile, tiles_m, PROGRAMS, BLOCK_M, BLOCK_N)
            a = a_desc.load([off_m, k_block * BLOCK_K])
            w = _tma_weights(w_desc, w_zero_ptr, off_n, k_block * BLOCK_K, N, PACKED, BLOCK_N,
                             BLOCK_K)
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            if k_block == k_blocks - 1:
                _persistent_epilogue(acc, out_desc, off_m, off_n, N, z_a, scale, w_sum_ptr,
                                     w_scale_ptr, bias_ptr, HAS_BIAS, BLOCK_N)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)


def autotuned(kernel, tiles, key: list[str]):
    """``kernel`` under triton.autotune over ``tiles`` (BLOCK_M, BLOCK_N, BLOCK_K, warps,
    stages), timed once per value of the ``key`` arguments."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                             num_stages=stages) for m, n, k, w, stages in tiles]
    return tuner(configs, key)(kernel)


# A tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) every launch takes instead of autotune's
# choice; None: autotune's. For benchmarks/real_tile_sweep.py, which times each tile by itself.
FORCE_TILE: tuple[int, int, int, int, int] | None = None


def launch(kernel, tuned, tiles, m: int, n: int, operands, flags) -> None:
    """A kernel over an ``m × n`` output in BLOCK_M × BLOCK_N programs: the tile autotune found
    fastest for this shape (``tuned``, timed on its first call), or ``tiles[0]`` where
    :func:`~qlip.quant.fused_quantize.fixed_tile` (the interpreter, ``QLIP_AUTOTUNE=0``), or
    :data:`FORCE_TILE` where set."""
    if fixed_tile() or FORCE_TILE is not None:
        block_m, block_n, block_k, warps, stages = FORCE_TILE or tiles[0]
        extra = {} if FORCE_TILE is None else {"num_warps": warps, "num_stages": stages}
        kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *operands, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **extra)
    else:
        tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
            *operands, **flags)


# Where the integer path's activation codes come from (Linear layers and convs alike): True, one
# element-wise launch rounds the layer's input to int8 codes once per call (:func:`int8_codes`; a
# conv's already padded, qlip.quant.real_conv.padded_codes) and the GEMM reads those bytes;
# False, every tile of the GEMM rounds its own block of x, once for each tile of output
# channels (N / BLOCK_N times over; by count, more work than the int8 MMA it feeds).
PREQUANTIZE = True
CODES_BLOCK = 1024  # elements a program of the codes kernel rounds
CODES_WARPS = 4  # its warps (benchmarks/real_tile_sweep.py times other choices)
# Under torch.compile, where the codes come from: True, PyTorch ops in the compiled graph
# (:func:`graph_codes`, the simulation's own ops), which Inductor fuses into the kernel that
# produces the layer's input; False, the codes kernel inside the operator, a pass of its own
# over the input (3.0 ms of a 28.9 ms compiled SD 1.4 step at batch 8 on an H100, the
# sixteenth session). Eager calls always launch the codes kernel.
CODES_IN_GRAPH = True


def int8_codes(x: torch.Tensor, table, choice, step, steps: int, integer, offset) -> torch.Tensor:
    """The int8 codes ``a = c − low − o_a`` of a dense ``x`` (an int8 tensor of x's shape and
    strides) at the option ``choice`` names, in one launch; left unwritten where that option
    runs in float math (the GEMM then reads x)."""
    a = torch.empty_like(x, dtype=torch.int8)
    n = x.numel()
    if n:  # (a grid of 0 programs is refused)
        _int8_codes_kernel[(triton.cdiv(n, CODES_BLOCK),)](
            x, a, table, choice, step, integer, offset, n, steps, HAS_STEPS=bool(steps),
            BLOCK=CODES_BLOCK, num_warps=CODES_WARPS)
    return a


def option_grid(table: torch.Tensor, choice: torch.Tensor, step: torch.Tensor,
                steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The option's grid ``(Δ, low, high)`` (``[1]`` each, the table's dtype) from a bank's
    flat table ``[K·T, 3]``: row ``choice·T + step`` (``choice`` where the bank has no per-step
    rows), gathered on the device."""
    rows = choice * steps + step if steps else choice
    return table.index_select(0, rows).unbind(1)


def graph_codes(x: torch.Tensor, table, choice, step, steps: int, offset,
                padding: tuple[int, int] | None = None) -> torch.Tensor:
    """The int8 codes ``a = c − low − o_a`` of ``x`` in PyTorch ops, for a compiled graph to fuse
    (:data:`CODES_IN_GRAPH`): ``c = clamp(round(x/Δ), low, high)`` as the simulation's
    quantizer computes it (``StackedUniform._quantize``), so a compiled real layer takes the
    compiled simulation's integers. ``padding`` ``(PH, PW)``: ``x`` is NHWC and the codes come
    padded, the border the code 0 (``a = z_a``), as :func:`qlip.quant.real_conv.padded_codes`
    writes them. Where the option runs in float math the values are unused."""
    scale, low, high = option_grid(table, choice, step, steps)
    c = torch.div(x, scale).round_().clamp_(low, high)
    if padding is not None:  # the simulation pads the quantized input with exact zeros
        c = torch.nn.functional.pad(c, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    return (c - low - offset.index_select(0, choice).to(c.dtype)).to(torch.int8)


def codes_in_graph() -> bool:
    """Whether a real layer's codes are PyTorch ops of the graph being compiled."""
    return CODES_IN_GRAPH and PREQUANTIZE and torch.compiler.is_compiling()


if triton is not None:
    # (FLOAT_W in the key: its bf16 weight tiles take more shared memory, and 128×256×128
    # does not fit with them, 288 KB on sm_90, where it fits without, 224 KB)
    _LINEAR_KEY = ["M", "N", "K", "IEEE", "PRE", "ZERO", "FLOAT_W"]
    _real_linear_tuned = autotuned(_real_linear_kernel, TILES, _LINEAR_KEY)
    _packed_linear_tuned = autotuned(_real_linear_kernel, TILES, _LINEAR_KEY)

    def _descriptor_blocks(nargs: dict) -> None:
        """triton.autotune's pre-hook: each TMA descriptor's block, the config's tile."""
        m, n, k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["a_desc"].block_shape = [m, k]
        nargs["w_desc"].block_shape = [n, k // 2 if nargs.get("PACKED") else k]
        nargs["out_desc"].block_shape = [m, n]

    _persistent_tuned = tuner([triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                                             num_warps=w, num_stages=st, pre_hook=_descriptor_blocks)
                               for m, n, k, w, st in TILES], ["M", "N", "K", "PACKED"])(_persistent_linear_kernel)

# Integer-only Linear layers (every option at most 8 bits, centered int8 weight codes) through the
# persistent TMA kernel (:func:`_persistent_linear_kernel`) instead of one program a tile. On an
# H100 (nineteenth session) it pays on the GPU and costs on the host: alone, from a CUDA graph,
# it ran the SD 1.4 step's Linear GEMMs at 0.83–1.16× cuBLAS's bf16 (the one-tile kernel
# 1.2–1.9×), and the compiled W4A8 step replayed from a CUDA graph took 23.35 ms against 24.86
# (bf16 19.34); but each launch encodes three TMA descriptors on the host, so steps that are
# not graph-replayed got slower (eager 75.7 against 67.4 ms, compiled 62.8 against 55.6).
# So by default (None) a launch takes it only while a CUDA graph is being captured, where the
# host's work is done once and every replay skips it; True: always; False: never.
PERSISTENT: bool | None = None
# The persistent kernel's tile while a graph is captured (autotune times its candidates by
# running them, which a capture cannot): by N, the fastest of ten tiles on each of the SD 1.4
# step's six largest Linear shapes on an H100 (nineteenth session's sweep; N ≥ 2048: 0.065–0.122
# ms, the rest 0.026–0.062 ms).
PERSISTENT_WIDE = (128, 256, 128, 8, 3)
PERSISTENT_NARROW = (128, 128, 128, 8, 4)

# Packed 4-bit weights: True (the default), every call first unpacks the layer's bytes into its
# centered codes (int8, or e4m3 for fp8 layers) by one launch of :func:`unpack_centered`, which
# the unpacked kernels then read: one extra write and read of the weights a call, in exchange for
# tiles that do no unpacking. The weights' memory stays the packed bytes' (the codes live until
# the layer's product is done). False, the integer kernels unpack each tile's bytes in registers
# (every output tile again) and fp8 layers unpack by PyTorch ops (Inductor's kernels when
# compiled). On an H100, SDXL's packed W4A8 step at batch 8 (fp8 Linear/1×1, int8 3×3 convs)
# ran at 1.10× compiled bf16 with this off (twenty-third session) and at 0.944× [0.933, 0.950]
# with it on (twenty-fourth), at 0.265× bf16's weight memory either way.
UNPACK_PACKED = True
UNPACK_BLOCK_N, UNPACK_BLOCK_H = 32, 64  # rows and bytes a program of the unpacking kernel

if triton is not None:
    @triton.jit
    def _unpack_kernel(packed_ptr, zero_ptr, out_ptr, N, K, KH, stride_p, FP8: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        """Bytes ``[N, KH]`` (row stride ``stride_p``; code ``2j`` in byte ``j``'s low nibble)
        minus each row's zero point, into ``out`` ``[N, K]``: int8, or e4m3 (``FP8``; every
        integer within ±16 is exact there). One read of the bytes, one write of the codes."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < N
        b = tl.load(packed_ptr + rows[:, None] * stride_p + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < KH), other=0)
        z = tl.load(zero_ptr + rows, mask=row_ok, other=0)
        low = (b & 15).to(tl.int32) - z[:, None]
        high = (b >> 4).to(tl.int32) - z[:, None]
        pair = tl.reshape(tl.join(low, high), [BLOCK_N, 2 * BLOCK_H])
        if FP8:
            codes = pair.to(tl.float32).to(tl.float8e4nv)
        else:
            codes = pair.to(tl.int8)
        out_cols = tl.program_id(1) * 2 * BLOCK_H + tl.arange(0, 2 * BLOCK_H)
        tl.store(out_ptr + rows[:, None] * K + out_cols[None, :], codes,
                 mask=row_ok[:, None] & (out_cols[None, :] < K))


def unpack_centered(packed: torch.Tensor, w_zero: torch.Tensor, k: int,
                    dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The centered codes ``w_c − z_w`` ``[N, k]`` of packed bytes (uint8 ``[N, ceil(k/2)]``,
    :func:`pack_rows`' order; zero points ``[N]``) in ``dtype`` (int8, or
    ``torch.float8_e4m3fn``), by one Triton launch: :func:`unpack_rows` and
    :func:`centered_codes` in one pass, the same values. Needs Triton (a CUDA GPU, or the
    interpreter on the CPU)."""
    if triton is None:
        raise RuntimeError("unpack_centered needs Triton: use centered_codes(unpack_rows(...))")
    n, kh = packed.shape
    if kh != (k + 1) // 2 or packed.dtype != torch.uint8 or packed.stride(1) != 1:
        raise ValueError(f"{tuple(packed.shape)} {packed.dtype} bytes do not hold {k} codes a row")
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"codes are unpacked to int8 or float8_e4m3fn, not {dtype}")
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, UNPACK_BLOCK_N), triton.cdiv(kh, UNPACK_BLOCK_H))
    _unpack_kernel[grid](packed, w_zero.to(torch.int32).contiguous(), out, n, k, kh,
                         packed.stride(0), FP8=dtype == torch.float8_e4m3fn,
                         BLOCK_N=UNPACK_BLOCK_N, BLOCK_H=UNPACK_BLOCK_H)
    return out


def unpack_wanted(w: torch.Tensor, w_zero: torch.Tensor | None) -> bool:
    """Whether a launch unpacks packed weights ``w`` first (:data:`UNPACK_PACKED`, with Triton;
    4-bit packed codes with their zero points)."""
    return (UNPACK_PACKED and triton is not None and w.dtype == torch.uint8
            and w_zero is not None)


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph on the current stream (a query of the
    stream's state: no sync)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def persistent_tile(n: int) -> tuple[int, int, int, int, int]:
    """The persistent kernel's tile for ``n`` output columns where autotune cannot run."""
    return PERSISTENT_WIDE if n >= 2048 else PERSISTENT_NARROW


def persistent_wanted(switch: bool | None, w: torch.Tensor, w_zero, out: torch.Tensor) -> bool:
    """What both persistent kernels (Linear, :mod:`~qlip.quant.real_conv`'s) need besides their
    operands' shapes: their ``switch`` on (None: while a CUDA graph is captured), Triton with
    host TMA descriptors, int8 centered codes or packed ones (:func:`zero_mode` 0 or 1, not the
    8-bit bracket), and a Hopper GPU or newer (TMA)."""
    wanted = capturing(out) if switch is None else switch
    return (bool(wanted) and TensorDescriptor is not None and zero_mode(w, w_zero) in (0, 1)
            and (not out.is_cuda or torch.cuda.get_device_capability(out.device) >= (9, 0)))


def persistent_programs(device: torch.device) -> int:
    """A persistent kernel's programs: one per SM (4 in the interpreter)."""
    return (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda" else 4)


def tile_options(warps: int, stages: int) -> dict:
    """A fixed tile's launch options: none where the interpreter's first tile runs
    (:func:`~qlip.quant.fused_quantize.fixed_tile`, no :data:`FORCE_TILE`), else its warps and
    stages."""
    if fixed_tile() and FORCE_TILE is None:
        return {}
    return {"num_warps": warps, "num_stages": stages}


def persistent_ok(a: torch.Tensor, w: torch.Tensor, w_zero, out: torch.Tensor) -> bool:
    """Whether :data:`PERSISTENT` can take this product (:func:`persistent_wanted`) and TMA can
    address its rows (16-byte aligned starts and strides: a packed row's K a multiple of 32)."""
    return (persistent_wanted(PERSISTENT, w, w_zero, out)
            and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
                    and t.stride(1) == 1 for t in (a, w, out)))


def _launch_persistent(a, w, out, table, choice, step, steps, offset, w_sum, w_zero, w_scale,
                       bias) -> None:
    """``out [M, N] = `` the integer product of the codes ``a [M, K]`` and ``w [N, K]``,
    scaled, through :func:`_persistent_linear_kernel` (its tile: autotune's; while a CUDA graph
    is captured, :func:`persistent_tile`'s; the first of :data:`TILES` where
    :func:`~qlip.quant.fused_quantize.fixed_tile`; :data:`FORCE_TILE` where set)."""
    m, k = a.shape
    n = w.shape[0]
    fixed = FORCE_TILE or (TILES[0] if fixed_tile() else
                           persistent_tile(n) if capturing(out) else None)
    block_m, block_n, block_k, warps, stages = fixed or TILES[0]
    packed = w.dtype == torch.uint8
    descs = (TensorDescriptor.from_tensor(a, [block_m, block_k]),
             TensorDescriptor.from_tensor(w, [block_n, block_k // 2 if packed else block_k]),
             TensorDescriptor.from_tensor(out, [block_m, block_n]))
    programs = persistent_programs(out.device)
    operands = (*descs, table, choice, step, offset, w_sum,
                w_zero if w_zero is not None else w_sum, w_scale,
                bias if bias is not None else w_scale, m, n, k, steps)
    flags = dict(HAS_STEPS=bool(steps), HAS_BIAS=bias is not None, PACKED=packed,
                 PROGRAMS=programs)

    def grid(meta):
        return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)
    if fixed is not None:
        _persistent_linear_kernel[grid(dict(BLOCK_M=block_m, BLOCK_N=block_n))](
            *operands, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            **tile_options(warps, stages))
    else:
        _persistent_tuned[grid](*operands, **flags)


def real_linear(x, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias,
                integer_only: bool = False, w_float: torch.Tensor | None = None):
    """``x [..., K]`` through the layer: one launch, integer or float math by the option that
    ``choice`` names (see the module doc); returns ``[..., N]`` in x's dtype. ``w`` is int8
    ``[N, K]`` codes, or uint8 ``[N, ceil(K/2)]`` packed 4-bit codes (:func:`pack_rows`).

    Under ``torch.compile`` the launch is the custom operator ``torch.ops.qlip.real_linear``, so
    that the compiled graph keeps it (an opaque call, its output's shape from a fake
    implementation) and fuses what lies around it, instead of breaking the graph or falling back
    to the simulation. Eager calls launch directly. ``integer_only``: every option of the
    layer runs in integer math (at most 8 bits), so that the kernel reads only the codes, never
    x: a compiled graph then hands the operator the codes alone (x None), and x's only
    consumer is the graph's codes ops, so Inductor writes the int8 codes instead of x (2 bytes
    an element fewer). (A stand-in of x's shape over one element cost the compiled SD 1.4 step
    a one-element kernel a layer, 0.29 ms of 25.2 on an H100, eighteenth session.) ``w_float``: the
    dequantized weights (:func:`float_weights`, ``[N, K]`` in x's dtype), which the float math
    of wider options then reads instead of dequantizing the codes in every tile."""
    k_dim = x.shape[-1]
    if k_dim > MAX_K:
        raise ValueError(f"integer execution accumulates K ≤ {MAX_K} exactly; got K = {k_dim}")
    if w.dtype == torch.uint8 and w.shape[1] != (k_dim + 1) // 2:
        raise ValueError(f"packed weights {tuple(w.shape)} do not hold K = {k_dim} codes a row")
    step = step if steps else choice
    if not torch.compiler.is_compiling():
        return _launch_linear(x, None, table, choice, step, steps, integer, offset, w, w_sum,
                              w_zero, w_scale, bias, w_float=w_float, integer_only=integer_only)
    a = graph_codes(x, table, choice, step, steps, offset) if codes_in_graph() else None
    read = a is None or not integer_only
    return torch.ops.qlip.real_linear(x if read else None, a, table, choice, step, steps,
                                      integer, offset, w, w_sum, w_zero, w_scale, bias, w_float,
                                      integer_only)


def _launch_linear(x: torch.Tensor | None, a: torch.Tensor | None, table: torch.Tensor,
                   choice: torch.Tensor, step: torch.Tensor, steps: int, integer: torch.Tensor,
                   offset: torch.Tensor, w: torch.Tensor, w_sum: torch.Tensor,
                   w_zero: torch.Tensor | None, w_scale: torch.Tensor,
                   bias: torch.Tensor | None,
                   w_float: torch.Tensor | None = None,
                   integer_only: bool = False) -> torch.Tensor:
    """``a``: x's int8 codes (:func:`graph_codes`, in a compiled graph), or None: the codes
    kernel rounds them here (where :data:`PREQUANTIZE`). ``x`` None (with ``a``): no option of
    the layer runs in float math, so the codes are all the kernel reads; the output then takes
    the codes' shape and the table's dtype (the table is in x's). ``w_float``,
    ``integer_only``: see :func:`real_linear` (an integer-only layer may take the persistent
    kernel, :data:`PERSISTENT`)."""
    if x is None and a is None:
        raise ValueError("a layer given no input (x None) needs its codes (a)")
    shape, dtype = (x.shape, x.dtype) if x is not None else (a.shape, table.dtype)
    lead, k_dim = shape[:-1], shape[-1]
    check_float_weights(w_float, w, k_dim, dtype)
    if unpack_wanted(w, w_zero):  # centered int8 codes for this call (UNPACK_PACKED)
        w, w_zero = unpack_centered(w, w_zero, k_dim), None
    table = table.contiguous()  # (a compiled graph may hand over a strided slice)
    m, n = lead.numel(), w.shape[0]
    out = torch.empty(m, n, device=w.device, dtype=dtype)
    x2 = out  # (x None: the kernel's x pointer, never read)
    if x is not None:
        x2 = x.reshape(-1, k_dim)
        if x2.stride(1) != 1 or (PREQUANTIZE and a is None and not x2.is_contiguous()):
            x2 = x2.contiguous()
    if a is not None:  # rows of K codes, one after the other, as the kernel reads them
        a = a.reshape(-1, k_dim).contiguous()
    elif PREQUANTIZE:
        a = int8_codes(x2, table, choice, step, steps, integer, offset)
    else:
        a = x2
    if a is not x2 and (integer_only or x is None) and persistent_ok(a, w, w_zero, out):
        _launch_persistent(a, w, out, table, choice, step, steps, offset, w_sum, w_zero,
                           w_scale, bias)
        return out.reshape(*lead, n)
    operands = (x2, a, w, out, table, choice, step, integer, offset, w_sum,
                w_scale if w_zero is None else w_zero, w_scale,
                bias if bias is not None else w_scale, w_float if w_float is not None else out,
                m, n, k_dim, (k_dim + 1) // 2, steps, x2.stride(0), w.stride(0), out.stride(0),
                k_dim)
    packed = w.dtype == torch.uint8
    flags = dict(HAS_STEPS=bool(steps), HAS_BIAS=bias is not None, IEEE=dtype == torch.float32,
                 PACKED=packed, PRE=a is not x2, ZERO=zero_mode(w, w_zero),
                 FLOAT_W=w_float is not None)
    if packed:
        launch(_real_linear_kernel, _packed_linear_tuned, TILES, m, n, operands, flags)
    else:
        launch(_real_linear_kernel, _real_linear_tuned, TILES, m, n, operands, flags)
    return out.reshape(*lead, n)


# the operator, for compiled graphs; eager calls launch directly (the dispatcher's Python
# custom-op path adds host time to every call of a host-bound eager step)
_real_linear_op = torch.library.custom_op("qlip::real_linear", mutates_args=())(_launch_linear)


@_real_linear_op.register_fake
def _(x, a, table, choice, step, steps, integer, offset, w, w_sum, w_zero, w_scale, bias,
      w_float=None, integer_only=False):
    if x is None:  # the codes alone: their shape, the table's dtype
        return a.new_empty(*a.shape[:-1], w.shape[0], dtype=table.dtype)
    return x.new_empty(*x.shape[:-1], w.shape[0])

