"""The autotuned launches of the attention and real-GEMM kernels (the GPU's path) give the
reference's values. Under the interpreter the tuner cannot time, so the kernels normally launch
with their first tile (as they do on the GPU in this suite: conftest sets QLIP_AUTOTUNE=0);
here each autotuned wrapper is rebuilt with one tile (which the tuner
takes without timing) and used in place of the interpreter's launch, so its grid function and
keyword arguments run."""

import pytest
import torch

from qlip.quant import fused_attention as fa
from qlip.quant import real_gemm as rg

from ..conftest import kernel_device, on

pytestmark = pytest.mark.skipif(
    kernel_device() is None, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")


def _one_tile(kernel, keys, **tile):
    import triton

    from qlip.quant.fused_quantize import tuner

    return tuner([triton.Config(tile, num_warps=4, num_stages=2)], keys)(kernel)


def test_the_tuner_times_each_tile_briefly(monkeypatch):
    """Each tile is timed with the project's short warm-up and repeats (Triton's defaults,
    25 + 100 ms a tile, add about 47 s per real variant of the SD 1.4 UNet)."""
    import inspect

    import triton

    from qlip.quant import fused_quantize as fq

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"Triton {triton.__version__}'s autotune takes no do_bench: its defaults time")
    seen = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda call, **kw: seen.append(kw) or [1.0, 1.0, 1.0])
    assert rg._real_linear_tuned.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert seen == [dict(warmup=fq.TUNE_WARMUP_MS, rep=fq.TUNE_REP_MS, quantiles=(0.5, 0.2, 0.8))]


def test_the_tuner_keeps_its_choices_on_disk(monkeypatch):
    """Where Triton's autotune can cache its results, the tuner asks it to: a second process
    then reads each shape's tile instead of compiling and timing every tile again."""
    import functools
    import inspect

    import triton

    from qlip.quant import fused_quantize as fq

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"Triton {triton.__version__}'s autotune cannot cache its results")
    seen = {}

    @functools.wraps(triton.autotune)  # (the tuner reads its signature)
    def recording(**kw):
        seen.update(kw)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", recording)
    fq.tuner([triton.Config({"BLOCK_M": 32})], ["M"])
    assert seen["cache_results"] is True and seen["key"] == ["M"]


def test_autotuned_attention_launch_equals_the_reference(monkeypatch):
    keys = ["N", "M", "HEAD_D", "LOWP"]
    monkeypatch.setattr(fa, "_stats_tuned", _one_tile(fa._stats_kernel, keys, BLOCK_M=32,
                                                      BLOCK_N=32))
    monkeypatch.setattr(fa, "_output_tuned", _one_tile(fa._output_kernel, keys, BLOCK_M=32,
                                                       BLOCK_N=32))
    monkeypatch.setattr(fa, "fixed_tile", lambda: False)
    device = kernel_device()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 40, generator=g).to(device) for n in (37, 21, 21))
    params = torch.tensor([[1 / 255, 0.0, 255.0, 0.0]] * 6, device=device)
    for mode, keep in ((fa.UNIFORM, True), (fa.UNIFORM, False)):
        got = fa.fused_attention(q, k, v, 0.15, lambda row_max: params, mode, keep,
                                 use_kernel=True)
        want = fa.reference_attention(q, k, v, 0.15, params, mode, keep)
        assert (got - want).abs().max() < 1e-5


def test_autotuned_real_linear_launch_equals_the_reference(monkeypatch):
    monkeypatch.setattr(rg, "_real_linear_tuned", _one_tile(
        rg._real_linear_kernel, ["M", "N", "K", "IEEE"], BLOCK_M=32, BLOCK_N=32, BLOCK_K=32))
    monkeypatch.setattr(rg, "fixed_tile", lambda: False)
    device = kernel_device()
    g = torch.Generator().manual_seed(1)
    n, k, m = 24, 70, 13
    codes = torch.randint(0, 16, (n, k), generator=g)
    w, w_sum, w_zero, w_scale = (on(t, device) for t in rg.weight_operands(
        codes, torch.rand(n, generator=g) * 0.1, torch.full((n,), 8.0), 4))
    integer, offset = (t.to(device) for t in rg.int8_offsets((4, 8, 16)))
    x = torch.randn(m, k, generator=g).to(device)
    table = torch.tensor([[0.1, -8, 7], [0.02, -128, 127], [1.0, -1e9, 1e9]], device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    for option in range(3):
        choice = torch.tensor([option], device=device)
        args = (x, table, choice, step, 0, integer, offset, w, w_sum, w_zero, w_scale, None)
        got, want = rg.real_linear(*args), rg.reference(*args)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_autotuned_real_conv_launch_equals_the_reference(monkeypatch):
    from qlip.quant import real_conv as rc

    monkeypatch.setattr(rc, "_conv_tuned", _one_tile(
        rc._real_conv_kernel, ["B", "H", "W", "C", "N", "KH", "KW", "IEEE"], BLOCK_M=32,
        BLOCK_N=32, BLOCK_K=32))
    monkeypatch.setattr(rg, "fixed_tile", lambda: False)  # the launch real_conv shares
    device = kernel_device()
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (12, 20 * 9), generator=g)
    w, w_sum, w_zero, w_scale = (on(t, device) for t in rg.weight_operands(
        codes, torch.rand(12, generator=g) * 0.1, torch.full((12,), 8.0), 4))
    integer, offset = (t.to(device) for t in rg.int8_offsets((4, 8, 16)))
    x = torch.randn(2, 20, 5, 5, generator=g).to(device)
    table = torch.tensor([[0.1, -8, 7], [0.02, -128, 127], [1.0, -1e9, 1e9]], device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    for option in range(3):
        args = (x, table, torch.tensor([option], device=device), step, 0, integer, offset, w,
                w_sum, w_zero, w_scale, None)
        got = rc.real_conv2d(*args, kernel_size=(3, 3), padding=(1, 1))
        want = rc.reference(*args, (3, 3), (1, 1))
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
