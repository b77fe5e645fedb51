"""Every Triton kernel compiles for Hopper (sm_90) through Triton's own front end and ptxas,
without a GPU: the interpreter runs kernels without that front end, so a kernel it accepts may
still fail to compile on the device (as two returns of different types once did)."""

import inspect

import pytest

from qlip.quant import fused_attention as fa
from qlip.quant import fused_quantize as fq
from qlip.quant import real_conv as rc
from qlip.quant import real_gemm as rg

pytestmark = pytest.mark.skipif(fq.triton is None, reason="needs Triton")

def _fake_quantize(per_image: bool):
    return lambda dt: (
        fq._fake_quantize_kernel,
        {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "table_ptr": f"*{dt}", "choice_ptr": "*i64",
         "step_ptr": "*i64", "bypass_ptr": "*i1"},
        {"HAS_STEPS": True, "HAS_BYPASS": True, "PER_IMAGE": per_image, "BLOCK_SIZE": 1024})


def _real_linear(tile, packed=False, pre=True, zero=None, float_w=False):
    """``zero``: real_gemm.zero_mode (default: 1 packed, 0 centered int8 codes); ``float_w``:
    the float options read stored dequantized weights."""
    block_m, block_n, block_k = tile[:3]
    zero = int(packed) if zero is None else zero
    return lambda dt: (
        rg._real_linear_kernel,
        {"x_ptr": f"*{dt}", "a_ptr": "*i8", "w_ptr": "*u8" if packed else "*i8",
         "out_ptr": f"*{dt}", "table_ptr": f"*{dt}",
         "choice_ptr": "*i64", "step_ptr": "*i64", "integer_ptr": "*i32", "offset_ptr": "*i32",
         "w_sum_ptr": "*i32", "w_zero_ptr": "*i32", "w_scale_ptr": "*fp32", "bias_ptr": f"*{dt}",
         "wf_ptr": f"*{dt}"},
        {"HAS_STEPS": True, "HAS_BIAS": True, "IEEE": dt == "fp32", "BLOCK_M": block_m,
         "BLOCK_N": block_n, "BLOCK_K": block_k, "PACKED": packed, "PRE": pre, "ZERO": zero,
         "FLOAT_W": float_w})


def _real_conv(tile, packed=False, tap_major=True, pre=True, zero=None, paired=False, stride=1,
               float_w=False):
    block_m, block_n, block_k = tile[:3]
    zero = int(packed) if zero is None else zero
    return lambda dt: (
        rc._real_conv_kernel,
        {"x_ptr": f"*{dt}", "a_ptr": "*i8", "w_ptr": "*u8" if packed else "*i8",
         "out_ptr": f"*{dt}", "table_ptr": f"*{dt}", "choice_ptr": "*i64", "step_ptr": "*i64",
         "integer_ptr": "*i32", "offset_ptr": "*i32", "w_sum_ptr": "*i32", "w_zero_ptr": "*i32",
         "w_scale_ptr": "*fp32", "bias_ptr": f"*{dt}", "wf_ptr": f"*{dt}"},
        {"KH": 3, "KW": 3, "PH": 1, "PW": 1, "HAS_STEPS": True, "HAS_BIAS": True,
         "IEEE": dt == "fp32", "PACKED": packed, "TAP_MAJOR": tap_major, "PRE": pre,
         "ZERO": zero, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
         "PAIRED": paired, "SH": stride, "SW": stride, "FLOAT_W": float_w})


def _persistent_linear(tile):
    """The persistent TMA kernel of integer-only Linear layers (real_gemm.PERSISTENT)."""
    block_m, block_n, block_k = tile[:3]
    return lambda dt: (
        rg._persistent_linear_kernel,
        {"a_desc": f"tensordesc<i8[{block_m}, {block_k}]>",
         "w_desc": f"tensordesc<i8[{block_n}, {block_k}]>",
         "out_desc": f"tensordesc<{dt}[{block_m}, {block_n}]>", "table_ptr": f"*{dt}",
         "choice_ptr": "*i64", "step_ptr": "*i64", "offset_ptr": "*i32", "w_sum_ptr": "*i32",
         "w_scale_ptr": "*fp32", "bias_ptr": f"*{dt}"},
        {"HAS_STEPS": True, "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
         "BLOCK_K": block_k, "PROGRAMS": 132})


CASES = {
    "fake_quantize": _fake_quantize(False),
    "fake_quantize_per_image": _fake_quantize(True),
    "int8_codes": lambda dt: (
        rg._int8_codes_kernel,
        {"x_ptr": f"*{dt}", "a_ptr": "*i8", "table_ptr": f"*{dt}", "choice_ptr": "*i64",
         "step_ptr": "*i64", "integer_ptr": "*i32", "offset_ptr": "*i32"},
        {"HAS_STEPS": True, "BLOCK": rg.CODES_BLOCK}),
    "padded_codes": lambda dt: (
        rc._padded_codes_kernel,
        {"x_ptr": f"*{dt}", "a_ptr": "*i8", "table_ptr": f"*{dt}", "choice_ptr": "*i64",
         "step_ptr": "*i64", "integer_ptr": "*i32", "offset_ptr": "*i32"},
        {"PH": 1, "PW": 1, "HAS_STEPS": True, "BLOCK": rc.CODES_BLOCK}),
    "real_linear": _real_linear(rg.TILES[0]),
    "real_linear_codes_in_tiles": _real_linear(rg.TILES[0], pre=False),
    "real_linear_row_sums": _real_linear(rg.TILES[0], zero=2),  # 8-bit weights' full bracket
    "real_linear_long_k": _real_linear((128, 128, 128)),  # the autotune tile with the longest K
    "real_linear_packed": _real_linear(rg.TILES[0], packed=True),
    "real_linear_packed_long_k": _real_linear((128, 128, 128), packed=True),
    "real_linear_float_weights": _real_linear((128, 128, 128), float_w=True),  # QLIP's A16
    "real_linear_persistent": _persistent_linear(rg.TILES[0]),
    "real_linear_persistent_large": _persistent_linear((128, 256, 128)),
    "real_conv": _real_conv(rg.TILES[0]),
    "real_conv_float_weights": _real_conv((128, 128, 128), float_w=True),
    "real_conv_weight_order_codes_in_tiles": _real_conv(rg.TILES[0], tap_major=False, pre=False),
    "real_conv_packed": _real_conv((128, 128, 64), packed=True, paired=True),  # as the model
    "real_conv_packed_gather": _real_conv((128, 128, 64), packed=True, tap_major=False),
    "real_conv_stride_2": _real_conv(rg.TILES[0], stride=2),  # the downsamplers
    "real_conv_row_sums": _real_conv(rg.TILES[0], zero=2),
    "attention_stats": lambda dt: (
        fa._stats_kernel,
        {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "m_ptr": "*fp32", "l_ptr": "*fp32",
         "m1_ptr": "*fp32", "scale2": "fp32"},
        {"HEAD_D": 40, "LOWP": dt != "fp32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}),
    "attention_output": lambda dt: (
        fa._output_kernel,
        {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}",
         "m_ptr": "*fp32", "inv_ptr": "*fp32", "p_ptr": "*fp32", "scale2": "fp32"},
        {"HEAD_D": 40, "MODE": 1, "KEEP_FIRST": True, "LOWP": dt != "fp32", "BLOCK_M": 64,
         "BLOCK_N": 64, "BLOCK_D": 64}),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name, dtype):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, pointers, constants = CASES[name](dtype)
    params = inspect.signature(kernel.fn).parameters
    signature = {p: pointers.get(p, "constexpr" if p in constants else "i32") for p in params}
    compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]  # ptxas produced machine code
