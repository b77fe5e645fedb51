"""Attention with fake-quantized probabilities that never materialises the ``[R, N, M]``
probability tensor: a Triton kernel in two passes, and the materialised reference it must equal.

Pass 1 reads q and k once per query block and keeps, per query row, the softmax statistics: the
row max ``m``, the normaliser ``l = Σ_j exp(s_j − m)``, and the max over the keys after the first
(``m1``, for DGQ's start-token handling). Between the passes, a few operations on ``[R]`` vectors
give each row its quantizer parameters (a log2 scale Δ is a max over whole images, so it needs
every row's statistics first). Pass 2 recomputes the scores block by block, normalises them,
fake-quantizes the probabilities in registers and multiplies them with v.

The probability quantizer of row ``r`` (rows are attention's batch×heads) is given per row by
``params [R, 4]``:

- ``UNIFORM``: ``(Δ, low, high, bypass)``: ``p̂ = clamp(round(p/Δ), low, high)·Δ`` (low = −z,
  high = 2^b − 1 − z), as :class:`qlip.quant.stacked.StackedUniform` computes it;
- ``LOG2``: ``(Δ, levels, 0, bypass)``: ``p̂ = Δ·2^−clamp(round(−log2(p/Δ)), 0, levels)``, as
  :func:`qlip.quant.log2.log2_quant`;

``bypass`` ≠ 0 leaves the row's probabilities as they are. With ``keep_first`` the first key's
column stays in full precision. ``round`` is round-half-to-even, as ``torch.round``.

Written by hand: no library fuses a fake quantizer into the softmax·V product. PyTorch's
``scaled_dot_product_attention`` and FlashAttention expose no hook between the normalisation and
the product with V.
"""

from __future__ import annotations

import math

import torch

from .fused_quantize import fixed_tile, triton, tuner

UNIFORM, LOG2 = 0, 1
TINY = torch.finfo(torch.float32).tiny

if triton is not None:  # Triton ships with PyTorch's CUDA wheels; a CPU install runs the reference
    import triton.language as tl


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on ``x``'s device (a CUDA tensor and Triton installed)."""
    return triton is not None and x.is_cuda


# -- the reference: materialised, in fp32 ------------------------------------------------------
def quantize_probs(p: torch.Tensor, params: torch.Tensor, mode: int) -> torch.Tensor:
    """``p [R, N, M]`` fake-quantized with the per-row ``params [R, 4]`` (see the module doc)."""
    a, b, c, bypass = (params[:, i, None, None].to(p.dtype) for i in range(4))
    if mode == UNIFORM:
        q = torch.clamp(torch.round(p / a), b, c) * a
    else:
        code = torch.round(-torch.log2((p / a).clamp_min(TINY)))
        q = a * torch.exp2(-torch.minimum(code.clamp_min(0), b))
    return torch.where(bypass != 0, p, q)


def _scores(q, k, scale: float) -> torch.Tensor:
    return torch.bmm(q.float(), k.float().transpose(1, 2)) * scale  # [R, N, M] fp32


def _times_v(probs, v, params, mode: int, keep_first: bool, dtype) -> torch.Tensor:
    quantized = quantize_probs(probs, params, mode)
    if keep_first:
        quantized = torch.cat([probs[:, :, :1], quantized[:, :, 1:]], dim=2)
    return torch.bmm(quantized, v.float()).to(dtype)


def reference_attention(q, k, v, scale: float, params: torch.Tensor, mode: int,
                        keep_first: bool = False) -> torch.Tensor:
    """The materialised computation the kernel must equal: softmax(q·kᵀ·scale), its probabilities
    fake-quantized per row, times v; in fp32, returned in q's dtype."""
    probs = torch.softmax(_scores(q, k, scale), dim=-1)
    return _times_v(probs, v, params, mode, keep_first, q.dtype)


def row_stats(q, k, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, l, m1)``, each ``[R, N]`` fp32: pass 1's statistics, computed in PyTorch (what the
    kernel's first pass must equal)."""
    s = _scores(q, k, scale)
    m = s.amax(dim=2)
    norm = torch.exp(s - m[..., None]).sum(dim=2)
    m1 = s[:, :, 1:].amax(dim=2) if s.shape[2] > 1 else torch.full_like(m, -math.inf)
    return m, norm, m1


def row_max_prob(m: torch.Tensor, norm: torch.Tensor, m1: torch.Tensor, skip_first: bool,
                 base2: bool = False):
    """``[R]``: each row's largest probability (over its keys after the first with
    ``skip_first``), from the softmax statistics, what a log2 scale Δ is the max of. ``base2``:
    ``m`` and ``m1`` in the kernels' base-2 units."""
    top = m1 if skip_first else m
    return ((torch.exp2 if base2 else torch.exp)(top - m) / norm).amax(dim=1)


# -- the kernel ---------------------------------------------------------------------------------
# The kernels work in base 2: scores times scale·log2(e), so every exponential is one exp2 (the
# GPU's native ex2). Their statistics m and m1 are in those units; kernel_row_stats and
# kernel_output convert at the public seam, fused_attention keeps them in base 2 throughout.
LOG2E, LN2 = 1 / math.log(2), math.log(2)

if triton is not None:

    @triton.jit
    def _load_rows(base, offs, count, offs_d, HEAD_D: tl.constexpr, LOWP: tl.constexpr,
                   ROWS: tl.constexpr):
        """Rows ``offs`` of a contiguous [count, HEAD_D] matrix at ``base``, zero-padded to the
        block: in their own 16-bit dtype with ``LOWP`` (tensor-core products, exact in the fp32
        accumulator), else fp32. ``ROWS``: mask the rows past ``count`` (a partial block). The
        head dim a compile-time constant, rows at a multiple of it: the loads are 16-byte
        vectors where it is a multiple of 8 (a runtime stride left them one element each)."""
        mask = offs_d[None, :] < HEAD_D
        if ROWS:
            mask = mask & (offs[:, None] < count)
        rows = tl.load(base + offs[:, None] * HEAD_D + offs_d[None, :], mask=mask, other=0.0)
        if not LOWP:  # a compile-time branch: one return (Triton wants one type per return)
            rows = rows.to(tl.float32)
        return rows

    @triton.jit
    def _dot(a, b, LOWP: tl.constexpr):
        if LOWP:
            out = tl.dot(a, b)
        else:
            out = tl.dot(a, b, input_precision="ieee")
        return out

    @triton.jit
    def _rint(x):
        """Round half to even, for |x| < 2^22: adding and taking away 1.5·2^23 leaves x rounded
        to an integer by fp32's own rounding (two adds, where a floor-and-tie test takes ten).
        Callers clamp first: the grids' bounds are integers, so clamping before rounding is
        the same as after."""
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _scores2(q, k_row, start, M, offs_d, scale2, HEAD_D: tl.constexpr, LOWP: tl.constexpr,
                 MASK: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key block's scores in base 2 (q·kᵀ·scale·log2 e), keys past M at −inf where
        ``MASK`` (the last, partial block and the first)."""
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_row, offs_n, M, offs_d, HEAD_D, LOWP, MASK)
        s = _dot(q, tl.trans(k), LOWP) * scale2
        if MASK:
            s = tl.where(offs_n[None, :] < M, s, float("-inf"))
        return s, offs_n

    @triton.jit
    def _stats_block(q, k_row, start, M, offs_d, scale2, m_i, l_i, HEAD_D: tl.constexpr,
                     LOWP: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
        """The online softmax's update over one key block: ``(m, l, block row max)``."""
        s, offs_n = _scores2(q, k_row, start, M, offs_d, scale2, HEAD_D, LOWP, MASK, BLOCK_N)
        top = tl.max(s, axis=1)
        m_new = tl.maximum(m_i, top)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        return m_new, l_i, top, s, offs_n

    @triton.jit
    def _stats_kernel(q_ptr, k_ptr, m_ptr, l_ptr, m1_ptr, N, M, scale2, HEAD_D: tl.constexpr,
                      LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        """Per query row: the max score m, the normaliser l and the max over the keys after the
        first m1 (m and m1 in base 2). The first key block is peeled (its keys after the first
        give m1's start; masked), the full blocks run unmasked, a partial last block masked.
        q ``[R, N, HEAD_D]`` and k ``[R, M, HEAD_D]`` contiguous. (A first block holding the
        leftover keys and whole blocks after it, two copies of the body instead of three, compiled
        in half the time but ran SD 1.4's largest shape 7% slower on an H100: 1.215 against
        1.131 ms in one run, the twenty-third session; the loops start at a constexpr here.)"""
        row = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(q_ptr + row * N * HEAD_D, offs_m, N, offs_d, HEAD_D, LOWP, True)
        k_row = k_ptr + row * M * HEAD_D
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        m_i, l_i, top, s, offs_n = _stats_block(q, k_row, 0, M, offs_d, scale2, m_i, l_i,
                                                HEAD_D, LOWP, True, BLOCK_N)
        m1_i = tl.max(tl.where(offs_n[None, :] > 0, s, float("-inf")), axis=1)
        full = M - M % BLOCK_N
        for start in range(BLOCK_N, full, BLOCK_N):
            m_i, l_i, top, s, offs_n = _stats_block(q, k_row, start, M, offs_d, scale2, m_i,
                                                    l_i, HEAD_D, LOWP, False, BLOCK_N)
            m1_i = tl.maximum(m1_i, top)
        tail = tl.maximum(full, BLOCK_N)
        if tail < M:
            m_i, l_i, top, s, offs_n = _stats_block(q, k_row, tail, M, offs_d, scale2, m_i, l_i,
                                                    HEAD_D, LOWP, True, BLOCK_N)
            m1_i = tl.maximum(m1_i, top)
        keep = offs_m < N
        tl.store(m_ptr + row * N + offs_m, m_i, mask=keep)
        tl.store(l_ptr + row * N + offs_m, l_i, mask=keep)
        tl.store(m1_ptr + row * N + offs_m, m1_i, mask=keep)

    @triton.jit
    def _output_block(acc, q, k_row, v_row, start, M, offs_d, scale2, m_i, inv, shift, a, low,
                      high, HEAD_D: tl.constexpr, MODE: tl.constexpr, FIRST: tl.constexpr,
                      LOWP: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
        """``acc`` plus one key block's quantized probabilities times v. Per query row, ``m_i``
        is the base-2 max score, ``inv`` is 1/(l·Δ) (see :func:`_inverse`), so
        ``2^(s − m)·inv`` is p/Δ, and ``shift = m − log2(inv)``, so ``s − shift`` is
        log2(p/Δ): ``MODE`` 0 (uniform) takes one exp2 an element, ``MODE`` 1 (log2) none for
        its code, ``MODE`` 2 is a bypassed row (Δ = 1). ``FIRST``: the block holding the first
        key, kept in full precision (DGQ's start token)."""
        s, offs_n = _scores2(q, k_row, start, M, offs_d, scale2, HEAD_D, LOWP, MASK, BLOCK_N)
        if MODE != 1 or FIRST:
            ratio = tl.exp2(s - m_i[:, None]) * inv[:, None]  # p/Δ
        if MODE == 0:  # clamp(round(p/Δ), low, high)·Δ
            pq = _rint(tl.minimum(tl.maximum(ratio, low), high)) * a
        elif MODE == 1:  # Δ·2^−clamp(round(−log2(p/Δ)), 0, high); high ≤ 126 (p/Δ ≥ 2^−126)
            pq = a * tl.exp2(-_rint(tl.minimum(tl.maximum(shift[:, None] - s, 0.0), high)))
        else:
            pq = ratio
        if FIRST:
            pq = tl.where(offs_n[None, :] == 0, ratio * a, pq)
        if MASK:
            pq = tl.where(offs_n[None, :] < M, pq, 0.0)  # padding keys carry nothing
        v = _load_rows(v_row, offs_n, M, offs_d, HEAD_D, LOWP, MASK)
        return acc + _dot(pq.to(v.dtype), v, LOWP)  # 16-bit probabilities, as the 16-bit path

    @triton.jit
    def _output_blocks(q, k_row, v_row, M, offs_d, scale2, m_i, inv, shift, a, low, high,
                       HEAD_D: tl.constexpr, MODE: tl.constexpr, KEEP_FIRST: tl.constexpr,
                       LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """Every key block, as pass 1 walks them: the first peeled and masked, full blocks
        unmasked, a partial last block masked."""
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc = _output_block(acc, q, k_row, v_row, 0, M, offs_d, scale2, m_i, inv, shift, a, low,
                            high, HEAD_D, MODE, KEEP_FIRST, LOWP, True, BLOCK_N)
        full = M - M % BLOCK_N
        for start in range(BLOCK_N, full, BLOCK_N):
            acc = _output_block(acc, q, k_row, v_row, start, M, offs_d, scale2, m_i, inv, shift,
                                a, low, high, HEAD_D, MODE, False, LOWP, False, BLOCK_N)
        tail = tl.maximum(full, BLOCK_N)
        if tail < M:
            acc = _output_block(acc, q, k_row, v_row, tail, M, offs_d, scale2, m_i, inv, shift,
                                a, low, high, HEAD_D, MODE, False, LOWP, True, BLOCK_N)
        return acc

    @triton.jit
    def _output_kernel(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, inv_ptr, p_ptr, N, M, scale2,
                       HEAD_D: tl.constexpr, MODE: tl.constexpr, KEEP_FIRST: tl.constexpr,
                       LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """Pass 2 over one query block of one row (q, k, v and the output contiguous). A
        bypassed row (its quantizer off) takes a loop of its own: the choice is the row's, so
        no element pays for it."""
        row = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(q_ptr + row * N * HEAD_D, offs_m, N, offs_d, HEAD_D, LOWP, True)
        k_row, v_row = k_ptr + row * M * HEAD_D, v_ptr + row * M * HEAD_D
        m_i = tl.load(m_ptr + row * N + offs_m, mask=offs_m < N, other=0.0)
        inv = tl.load(inv_ptr + row * N + offs_m, mask=offs_m < N, other=1.0)
        shift = m_i - tl.log2(inv)
        a = tl.load(p_ptr + row * 4)
        low = tl.load(p_ptr + row * 4 + 1)
        high = tl.load(p_ptr + row * 4 + 2)
        if MODE == 1:  # (Δ, levels, ·): the codes' bound is the levels, p/Δ ≥ 2^−126
            high = tl.minimum(low, 126.0)
        if tl.load(p_ptr + row * 4 + 3) != 0.0:
            acc = _output_blocks(q, k_row, v_row, M, offs_d, scale2, m_i, inv, shift, 1.0, low,
                                 high, HEAD_D, 2, KEEP_FIRST, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
        else:
            acc = _output_blocks(q, k_row, v_row, M, offs_d, scale2, m_i, inv, shift, a, low,
                                 high, HEAD_D, MODE, KEEP_FIRST, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
        tl.store(o_ptr + row * N * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_D))


def _blocks(d: int) -> tuple[int, int, int]:
    """The interpreter's tiles: ``(BLOCK_M, BLOCK_N, BLOCK_D)`` for head dim ``d``."""
    block_d = max(16, 1 << (d - 1).bit_length())
    block_n = 32 if block_d > 64 else 64
    return 64, block_n, block_d


# (BLOCK_M, BLOCK_N, warps, stages) that triton.autotune times once per shape on the GPU,
# keeping the fastest for each pass (BLOCK_D is the head dim rounded up to a power of two). A
# tile that does not fit the device's shared memory is skipped by the tuner. The first is the
# fixed tile the kernel ran with before (the eighth session's run 7: 20.1 ms a SD 1.4 step
# against 22.1 ms materialised).
ATTENTION_TILES = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2),
                   (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3)]

if triton is not None:
    def _tuned(kernel):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=stages)
                   for m, n, w, stages in ATTENTION_TILES]
        return tuner(configs, ["N", "M", "HEAD_D", "LOWP"])(kernel)

    _stats_tuned, _output_tuned = _tuned(_stats_kernel), _tuned(_output_kernel)


def _launch(kernel, tuned, rows: int, n: int, d: int, *args, **flags) -> None:
    """One pass over ``rows`` × query blocks: the autotuned tiles on the GPU, the first tile
    where :func:`~qlip.quant.fused_quantize.fixed_tile` (the interpreter, ``QLIP_AUTOTUNE=0``)."""
    bm, bn, bd = _blocks(d)
    if fixed_tile():
        kernel[(triton.cdiv(n, bm), rows)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    else:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), rows)](*args, **flags, BLOCK_D=bd)


def _low_precision(q: torch.Tensor) -> bool:
    """bf16/fp16 inputs: the products on tensor cores in the inputs' dtype (each product exact in
    the fp32 accumulator; the quantized probabilities rounded to that dtype before the product
    with v, as the materialised path in that dtype rounds them). fp32 inputs: IEEE fp32 products,
    equal to the fp32 reference within rounding."""
    return q.dtype in (torch.bfloat16, torch.float16)


def _stats2(q, k, scale: float):
    """Pass 1 on the device: ``(m, l, m1)``, each ``[R, N]`` fp32, m and m1 in base 2."""
    q, k = q.contiguous(), k.contiguous()
    rows, n, d = q.shape
    m = torch.empty(rows, n, device=q.device, dtype=torch.float32)
    norm, m1 = torch.empty_like(m), torch.empty_like(m)
    _launch(_stats_kernel, _stats_tuned, rows, n, d,
            q, k, m, norm, m1, n, k.shape[1], scale * LOG2E, HEAD_D=d, LOWP=_low_precision(q))
    return m, norm, m1


def _inverse(norm: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` fp32: per query row, ``1/(l·Δ)`` (Δ = 1 for a bypassed row), so that pass 2
    has p/Δ as ``2^(s − m)`` times it."""
    step = torch.where(params[:, 3] != 0, torch.ones_like(params[:, 0]), params[:, 0]).float()
    return 1 / (norm * step[:, None])


def _output2(q, k, v, m2, inv, params: torch.Tensor, scale: float, mode: int,
             keep_first: bool) -> torch.Tensor:
    """Pass 2 on the device from base-2 row maxima and the rows' :func:`_inverse`: the output
    ``[R, N, d]`` in q's dtype."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rows, n, d = q.shape
    out = torch.empty_like(q)
    _launch(_output_kernel, _output_tuned, rows, n, d,
            q, k, v, out, m2.contiguous(), inv.contiguous(), params.float().contiguous(), n,
            k.shape[1], scale * LOG2E, HEAD_D=d, MODE=mode, KEEP_FIRST=keep_first,
            LOWP=_low_precision(q))
    return out


def kernel_row_stats(q, k, scale: float):
    """Pass 1 on the device: ``(m, l, m1)``, each ``[R, N]`` fp32, as :func:`row_stats`."""
    m2, norm, m1_2 = _stats2(q, k, scale)
    return m2 * LN2, norm, m1_2 * LN2


def kernel_output(q, k, v, m, norm, params: torch.Tensor, scale: float, mode: int,
                  keep_first: bool) -> torch.Tensor:
    """Pass 2 on the device, from :func:`row_stats`' statistics: the attention output
    ``[R, N, d]`` in q's dtype."""
    return _output2(q, k, v, m * LOG2E, _inverse(norm, params), params, scale, mode,
                    keep_first)


# The two passes as custom operators, for compiled graphs: Inductor keeps each an opaque call
# (its output's shape from a fake implementation) and fuses the [R]-vector work between them,
# where tracing the autotuned kernels themselves failed to compile on an H100 (torch 2.11,
# twentieth session: an InductorError from its compile worker, on _stats_kernel). Eager calls
# launch directly (the dispatcher's Python custom-op path adds host time to every call).
@torch.library.custom_op("qlip::attention_row_stats", mutates_args=())
def _row_stats_op(q: torch.Tensor, k: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _stats2(q, k, scale)


@_row_stats_op.register_fake
def _(q, k, scale):
    rows, n, _ = q.shape
    return tuple(q.new_empty(rows, n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("qlip::attention_output", mutates_args=())
def _output_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
               inv: torch.Tensor, params: torch.Tensor, scale: float, mode: int,
               keep_first: bool) -> torch.Tensor:
    return _output2(q, k, v, m, inv, params, scale, mode, keep_first)


@_output_op.register_fake
def _(q, k, v, m, inv, params, scale, mode, keep_first):
    return q.new_empty(q.shape)


def fused_attention(q, k, v, scale: float, params_for, mode: int, keep_first: bool = False,
                    use_kernel: bool | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)`` with fake-quantized probabilities, times ``v``; q ``[R, N, d]``,
    k and v ``[R, M, d]``. ``params_for(row_max [R]) -> params [R, 4]`` gives each row's
    quantizer parameters from each row's largest probability (a log2 Δ needs it; a uniform grid
    ignores it). ``use_kernel``: the Triton kernel (default where :func:`available`), else the
    same computation in PyTorch, materialising the probabilities. Under ``torch.compile`` the
    two passes are the custom operators ``torch.ops.qlip.attention_row_stats`` and
    ``torch.ops.qlip.attention_output`` (their statistics in base 2)."""
    kernel = available(q) if use_kernel is None else use_kernel
    if kernel and torch.compiler.is_compiling():  # (see _row_stats_op)
        m, norm, m1 = torch.ops.qlip.attention_row_stats(q, k, float(scale))
        params = params_for(row_max_prob(m, norm, m1, keep_first, base2=True))
        return torch.ops.qlip.attention_output(q, k, v, m, _inverse(norm, params), params,
                                               float(scale), mode, keep_first)
    if kernel:
        m, norm, m1 = _stats2(q, k, scale)
        params = params_for(row_max_prob(m, norm, m1, keep_first, base2=True))
        return _output2(q, k, v, m, _inverse(norm, params), params, scale, mode, keep_first)
    probs = torch.softmax(_scores(q, k, scale), dim=-1)  # the scores once
    quantized = probs[:, :, 1:] if keep_first else probs
    row_max = (quantized.amax(dim=(1, 2)) if quantized.shape[2]
               else probs.new_zeros(probs.shape[0]))
    return _times_v(probs, v, params_for(row_max), mode, keep_first, q.dtype)
