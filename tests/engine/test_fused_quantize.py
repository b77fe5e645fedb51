"""The one-launch activation quantizer (qlip.quant.fused_quantize) gives the PyTorch path's values
bit for bit, kernel against reference and in a quantized UNet (run where Triton can: on CUDA, or
on the CPU under TRITON_INTERPRET=1)."""

import copy

import pytest
import torch

from qlip.nn import QuantConfig, use_fused_quantize
from qlip.quant import fused_quantize as fq
from qlip.quant.stacked import StackedUniform

from ..conftest import kernel_device, kernel_unet

needs_kernel = pytest.mark.skipif(
    kernel_device() is None, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")


def _quantizer(steps):
    q = StackedUniform((4, 8, 32), num_steps=steps)
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for step in range(steps or 1):
            q.slot_view(bits).calibrate(torch.randn(500, generator=g) * (1 + step),
                                        step=step if steps else None)
    return q


def test_the_per_image_reference_is_the_stacked_quantizers_split_path():
    # what the kernel must equal, per image, is what StackedUniform computes without it
    q = _quantizer(3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * 3 * 2, 5, 4, generator=g) * 2  # [copies 2, images 3, heads 2] rows
    choice, step = torch.tensor([0, 2, 1]), torch.tensor([1])  # 4 bits, bypass, 8 bits
    want = q(x, choice, heads=2, step=step)
    got = fq.reference(x, q._flat_table(torch.float32), choice, step, 3, q.bypass, heads=2)
    assert torch.equal(got, want)


def test_off_the_gpu_the_pytorch_path_runs():
    q = _quantizer(None)
    assert not fq.available(torch.zeros(3))  # a CPU tensor: never the kernel
    x = torch.randn(4, 5)
    assert q._one_launch(x, torch.tensor([1]), None) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", [None, 3], ids=["one_row", "per_step"])
def test_kernel_equals_the_reference_bit_for_bit(dtype, steps):
    device = kernel_device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest)")
    q = _quantizer(steps).to(device)
    table = q._flat_table(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, 129, generator=g) * 3).to(device, dtype)  # not a multiple of the block
    for choice in range(3):  # 4 bits, 8 bits, bypass (32)
        for step in range(steps or 1):
            c, s = torch.tensor([choice], device=device), torch.tensor([step], device=device)
            want = fq.reference(x, table, c, s if steps else None, steps or 0, q.bypass)
            got = fq.fake_quantize(x, table, c, s if steps else None, steps or 0, q.bypass)
            assert got.dtype == dtype and torch.equal(got, want), (choice, step)
    # ties round to even, values past the grid clamp, as torch.round and clamp do
    scale = float(table[0, 0])
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e4, -1e4], dtype=torch.float32) * scale
    ties = ties.to(device, dtype)
    c = torch.tensor([0], device=device)
    step = torch.tensor([0], device=device) if steps else None
    assert torch.equal(fq.fake_quantize(ties, table, c, step, steps or 0, None),
                       fq.reference(ties, table, c, step, steps or 0, None))


@needs_kernel
@pytest.mark.parametrize("heads", [1, 3])
def test_per_image_choices_in_one_launch(heads):
    device = kernel_device()
    q = _quantizer(3).to(device)
    table = q._flat_table(torch.float32)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2 * 4 * heads, 7, 9, generator=g) * 2).to(device)  # 2 copies of 4 images
    choice = torch.tensor([1, 0, 2, 1], device=device)
    step = torch.tensor([2], device=device)
    got = fq.fake_quantize(x, table, choice, step, 3, q.bypass, heads)
    assert torch.equal(got, fq.reference(x, table, choice, step, 3, q.bypass, heads))
    on_cpu = copy.deepcopy(q).cpu()  # Module.cpu() moves in place: the kernel below needs q on
    # the device (the H200 run failed here: a bypass tensor moved to the CPU)
    assert torch.equal(got, on_cpu(x.cpu(), choice.cpu(), heads=heads, step=step.cpu()).to(device))
    shared = torch.tensor([1], device=device).expand(4)  # one option for all, as a [n] view
    assert torch.equal(fq.fake_quantize(x, table, shared, step, 3, q.bypass, heads),
                       fq.reference(x, table, shared, step, 3, q.bypass, heads))
    with pytest.raises(ValueError, match="whole copies"):
        fq.fake_quantize(x[:-1], table, choice, step, 3, q.bypass, heads)


@needs_kernel
def test_channels_last_and_strided_inputs_give_the_same_values_and_layout():
    device = kernel_device()
    q = _quantizer(None).to(device)
    table, c = q._flat_table(torch.float32), torch.tensor([1], device=device)
    x = torch.randn(2, 5, 6, 7, device=device).to(memory_format=torch.channels_last)
    got = fq.fake_quantize(x, table, c, None, 0, q.bypass)
    assert got.is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    assert torch.equal(got, fq.reference(x, table, c, None, 0, q.bypass))
    strided = torch.randn(6, 10, device=device)[:, ::3]  # not dense: copied first
    assert torch.equal(fq.fake_quantize(strided, table, c, None, 0, None),
                       fq.reference(strided, table, c, None, 0, None))


@needs_kernel
def test_an_uncalibrated_option_gives_nan_in_the_kernel_too():
    device = kernel_device()
    q = StackedUniform((4, 8)).to(device)  # never calibrated: NaN scales
    out = fq.fake_quantize(torch.randn(10, device=device), q._flat_table(torch.float32),
                           torch.tensor([1], device=device), None, 0, None)
    assert torch.isnan(out).all()


@needs_kernel
def test_quantized_unet_gives_the_same_outputs_with_the_kernel(tiny_pipe, monkeypatch):
    unet, units, calls, (x, t, c) = kernel_unet(
        tiny_pipe, monkeypatch, QuantConfig(wbits=4, abits=8, abits_options=(4, 8, 32)),
        spy=(fq, "fake_quantize"))
    for bits in (4, 8, 32):
        for unit in units.values():
            unit.set_bits(bits)
        outs = []
        for on in (False, True):
            assert use_fused_quantize(unet, on) > 0
            calls.clear()
            with torch.no_grad():
                outs.append(unet(x, t, encoder_hidden_states=c).sample)
            assert bool(calls) == on  # the kernel ran exactly when it was on
        assert torch.equal(outs[0], outs[1]), bits
    # per-image bits (the CFG pair of each image shares them) take the kernel too
    for unit in units.values():
        unit.set_bits(torch.tensor([4, 32]))
    x2, t2, c2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([c * 0, c])
    outs = []
    for on in (False, True):
        use_fused_quantize(unet, on)
        calls.clear()
        with torch.no_grad():
            outs.append(unet(x2, t2, encoder_hidden_states=c2).sample)
        assert bool(calls) == on
    assert torch.equal(outs[0], outs[1])
