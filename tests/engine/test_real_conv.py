"""Real execution of a quantized convolution (qlip.quant.real_conv): an implicit GEMM whose
integer options give the exact product of the simulation's quantized input (zeros padded after
quantization) and dequantized weights, checked in float64; float math at A16 (run where Triton
can: on CUDA, or on the CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from qlip.quant import real_conv as rc
from qlip.quant import real_gemm as rg

from ..conftest import kernel_device, on

needs_kernel = pytest.mark.skipif(
    kernel_device() is None, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")

# options' grid rows (Δ, low, high): 4 bits, 8 bits, 16 bits (float math), and a 4-bit grid
# whose range leaves 0 out (low = 3): a padded tap must still be an exact zero
TABLE = torch.tensor([[0.2, -8.0, 7.0], [0.02, -128.0, 127.0], [1.0, -1e9, 1e9], [0.3, 3.0, 18.0]])
INTEGER = torch.tensor([1, 1, 0, 1], dtype=torch.int32)
OFFSET = torch.tensor([0, 128, 0, 0], dtype=torch.int32)


@needs_kernel
@pytest.mark.parametrize("c", [40, 13], ids=["c_even", "c_odd"])  # packed tap-major: whole
# byte pairs a tap (read 16 at a time), or a gather by channel
@pytest.mark.parametrize("packed", [False, True], ids=["int8", "packed"])
@pytest.mark.parametrize("tap_major", [False, True], ids=["weight_order", "tap_major"])
@pytest.mark.parametrize("pre", [True, False], ids=["codes_first", "codes_in_tiles"])
@pytest.mark.parametrize("kernel,padding,stride", [((3, 3), (1, 1), (1, 1)),
                                                   ((3, 3), (0, 0), (1, 1)),
                                                   ((1, 3), (0, 1), (1, 1)),
                                                   ((3, 3), (1, 1), (2, 2)),  # a downsampler
                                                   ((1, 1), (0, 0), (2, 1))])
def test_conv_options_give_the_exact_product_of_the_quantized_operands(kernel, padding, stride,
                                                                      packed, tap_major, pre, c,
                                                                      monkeypatch):
    monkeypatch.setattr(rg, "PREQUANTIZE", pre)  # the input's codes rounded once, or per tile
    device = kernel_device()
    g = torch.Generator().manual_seed(3)
    b, h, w, n = 2, 5, 6, 24  # C not a multiple of the channel block, M not of the tile
    codes = torch.randint(0, 16, (n, c * kernel[0] * kernel[1]), generator=g)
    scale, zero = torch.rand(n, generator=g) * 0.05 + 0.01, torch.randint(4, 12, (n,)).float()
    rows = rc.tap_major_rows(codes, kernel) if tap_major else codes
    assert torch.equal(rc.channel_major_rows(rows, kernel), codes) or not tap_major
    weights = rg.weight_operands(rows, scale, zero, 4,
                                 packed=rg.pack_rows(rows) if packed else None)
    x, bias = torch.randn(b, c, h, w, generator=g), torch.randn(n, generator=g)
    weight = ((codes.double() - zero.double()[:, None]) * scale.double()[:, None]).reshape(
        n, c, *kernel)
    for choice in range(len(TABLE)):
        args = [t.to(device) for t in (x, TABLE, torch.tensor([choice]), torch.zeros(1).long())]
        args += [0] + [on(t, device) for t in (INTEGER, OFFSET, *weights, bias)]
        got = rc.real_conv2d(*args, kernel_size=kernel, padding=padding, tap_major=tap_major,
                             stride=stride).cpu().double()
        delta, low, high = TABLE[choice].tolist()
        xq = (torch.div(x, delta).round().clamp(low, high) * delta).double() if INTEGER[choice] \
            else x.double()
        want = torch.nn.functional.conv2d(xq, weight, bias.double(), stride=stride,
                                          padding=padding)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-5), choice
        again = rc.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args],
                             kernel, padding, tap_major, stride).double()
        assert torch.allclose(got, again, rtol=1e-6, atol=1e-5), choice


@needs_kernel
def test_per_step_rows_and_the_refusals():
    device = kernel_device()
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (8, 16 * 9), generator=g)
    weights = rg.weight_operands(codes, torch.rand(8, generator=g) * 0.01, torch.full((8,), 128.0), 8)
    table = torch.stack([TABLE[0] * torch.tensor([1.0 + 0.5 * s, 1, 1]) for s in range(3)])
    x = torch.randn(1, 16, 4, 4, generator=g)
    for step in range(3):  # option 0 at step s is row s
        args = [t.to(device) for t in (x, table, torch.tensor([0]), torch.tensor([step]))]
        args += [3] + [on(t, device) for t in (INTEGER[:1], OFFSET[:1], *weights)] + [None]
        got = rc.real_conv2d(*args, kernel_size=(3, 3), padding=(1, 1)).cpu()
        want = rc.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args],
                            (3, 3), (1, 1))
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-5), step
    with pytest.raises(ValueError, match="K = 144 codes"):
        rc.real_conv2d(*args[:7], weights[0][:, :10].to(device), *args[8:],
                       kernel_size=(3, 3), padding=(1, 1))


@needs_kernel
@pytest.mark.parametrize("tap_major", [False, True], ids=["weight_order", "tap_major"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_float_options_read_the_stored_float_weights_in_the_codes_order(tap_major, stride):
    """A conv given its dequantized weights (``w_float``, in the codes' order: tap-major or the
    weight's own) reads them at A16 instead of dequantizing each tile, to the same output; the
    integer options give the same exact product as without them."""
    device = kernel_device()
    g = torch.Generator().manual_seed(6)
    n, c, kernel = 24, 13, (3, 3)
    codes = torch.randint(0, 16, (n, c * 9), generator=g)
    rows = rc.tap_major_rows(codes, kernel) if tap_major else codes
    weights = rg.weight_operands(rows, torch.rand(n, generator=g) * 0.05 + 0.01,
                                 torch.randint(4, 12, (n,)).float(), 4)
    w_float = rg.float_weights(weights[0], weights[2], weights[3], torch.float32)
    x, bias = torch.randn(2, c, 5, 6, generator=g), torch.randn(n, generator=g)
    for choice in range(len(TABLE)):
        args = [t.to(device) for t in (x, TABLE, torch.tensor([choice]), torch.zeros(1).long())]
        args += [0] + [on(t, device) for t in (INTEGER, OFFSET, *weights, bias)]
        kw = dict(kernel_size=kernel, padding=(1, 1), tap_major=tap_major, stride=stride)
        plain = rc.real_conv2d(*args, **kw).cpu()
        stored = rc.real_conv2d(*args, **kw, w_float=w_float.to(device)).cpu()
        assert torch.equal(stored, plain), choice
    with pytest.raises(ValueError, match="w_float must be"):
        rc.real_conv2d(*args, **kw, w_float=w_float.t().to(device))
