"""benchmarks/step_profile.py sorts a step's CUDA kernels by kind from their names (below, names
in the forms PyTorch, cuDNN, cuBLAS/CUTLASS, Inductor and qlip's kernels take; not copied from a
profile of this session)."""

import pytest

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def step_profile():
    return load_benchmark("step_profile")


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn>", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void xmma_cudnn::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>", "layout"),
    ("triton_poi_fused_add_convolution_silu_3", "inductor"),
    ("_real_conv_kernel", "real_conv"),
    ("_real_linear_kernel", "real_gemm"),
    ("_persistent_linear_kernel", "real_gemm"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "gemm"),
    ("_fake_quantize_kernel", "quantize"),
    ("_stats_kernel", "fused_attention"),
    ("_unpack_e4m3_kernel", "unpack"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "other"),
])
def test_kernels_are_sorted_by_kind(step_profile, name, kind):
    assert step_profile.kind(name) == kind


def test_the_summary_is_per_step_and_adds_up(step_profile):
    events = [("sm90_xmma_gemm_bf16", 4000.0), ("_real_linear_kernel", 3000.0),
              ("triton_poi_fused_mul_0", 1000.0), ("Memcpy DtoD", 500.0)]
    out = step_profile.summarise(events, steps=5, top=2)
    assert out["by_kind_ms"] == {"gemm": 0.8, "real_gemm": 0.6, "inductor": 0.2, "other": 0.1}
    assert out["gpu_ms_per_step"] == pytest.approx(1.7)
    assert [k["name"] for k in out["largest_kernels"]] == ["sm90_xmma_gemm_bf16",
                                                          "_real_linear_kernel"]
