"""Real execution of a quantized convolution (qlip.quant.real_conv): an implicit GEMM whose
integer options give the exact product of the simulation's quantized input (zeros padded after
quantization) and dequantized weights, checked in float64; float math at A16 (run where Triton
can: on CUDA, or on the CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from qlip.quant import real_conv as rc
from qlip.quant import real_gemm as rg

from ..conftest import assert_same_epilogue, kernel_device, on

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


@needs_kernel
@pytest.mark.parametrize("h,w", [(4, 16), (2, 8)], ids=["rows_of_one_image", "whole_images"])
@pytest.mark.parametrize("bias_on", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["int8", "packed"])
def test_the_persistent_conv_kernel_gives_the_same_integer_product(h, w, bias_on, packed,
                                                                   monkeypatch):
    """An integer-only stride-1 conv through the persistent TMA kernel (rc.PERSISTENT): the same
    bits as the one-tile kernel at every integer option (the grid whose range leaves 0 out
    among them), for tiles of whole rows of one image (4 × 16 pixels: 4 rows a 64-pixel tile)
    and of whole images (2 × 8: four images a tile, the last tile past the batch), C = 48 over
    channel blocks of 32 (a tap's second block past C: TMA's zero fill meets the next tap's
    weights), N = 136 over tiles of 32 (more tiles than the interpreter's 4 programs); packed
    codes too (C = 96 over blocks of 64), centered in registers. A conv its boxes cannot take
    (stride 2, C not a multiple of 16, images whose rows do not tile) takes the one-tile
    kernel. The tile by N: the wide one from 1280 channels."""
    device = kernel_device()
    g = torch.Generator().manual_seed(8)
    b, c, n = 3, 96 if packed else 48, 136  # (packed: C a multiple of 32)
    codes = torch.randint(0, 16, (n, c * 9), generator=g)
    rows = rc.tap_major_rows(codes, (3, 3))
    weights = rg.weight_operands(rows, torch.rand(n, generator=g) * 0.05 + 0.01,
                                 torch.randint(5, 11, (n,), generator=g).float(), 4,
                                 packed=rg.pack_rows(rows) if packed else None)
    assert (weights[2] is None) != packed  # centered codes, or packed ones and their zeros
    x, bias = torch.randn(b, c, h, w, generator=g), torch.randn(n, generator=g)
    monkeypatch.setattr(rg, "FORCE_TILE", (64, 32, 64 if packed else 32, 4, 2))
    taken = []
    original = rc._launch_persistent_conv
    monkeypatch.setattr(rc, "_launch_persistent_conv",
                        lambda *a: taken.append(1) or original(*a))

    def run(x, weights, persistent, choice=1, **kw):
        monkeypatch.setattr(rc, "PERSISTENT", persistent)
        args = [t.to(device) for t in (x, TABLE, torch.tensor([choice]), torch.zeros(1).long())]
        args += [0] + [on(t, device) for t in (INTEGER, OFFSET, *weights,
                                                bias[:weights[0].shape[0]] if bias_on else None)]
        return rc.real_conv2d(*args, kernel_size=(3, 3), padding=kw.get("padding", (1, 1)),
                              tap_major=True, stride=kw.get("stride", (1, 1)),
                              integer_only=True).cpu()

    for choice in (0, 1, 3):  # the integer options
        plain = run(x, weights, False, choice)
        before = len(taken)
        persistent = run(x, weights, True, choice)
        assert len(taken) == before + 1
        assert_same_epilogue(persistent, plain, bias_on, device)
    before = len(taken)
    run(x, weights, True, stride=(2, 2))  # a downsampler
    run(torch.randn(b, c, 3, 12, generator=g), weights, True)  # 36 pixels: no whole tile
    odd_rows = rc.tap_major_rows(codes.reshape(n, c, 9)[:, :40].reshape(n, -1), (3, 3))
    odd = rg.weight_operands(odd_rows, torch.ones(n), torch.full((n,), 8.0), 4,
                             packed=rg.pack_rows(odd_rows) if packed else None)
    run(x[:, :40], odd, True)  # C = 40: rows TMA cannot address
    assert len(taken) == before
    monkeypatch.setattr(rg, "FORCE_TILE", None)
    assert rc.persistent_conv_tile(1280) == rc.PERSISTENT_CONV_WIDE
    assert rc.persistent_conv_tile(640) == rc.PERSISTENT_CONV_NARROW


def test_conv_boxes_tile_whole_rows_or_whole_images():
    assert rc.conv_box(64, 64, 128) == (1, 2)
    assert rc.conv_box(8, 8, 128) == (2, 8)
    assert rc.conv_box(128, 128, 128) == (1, 1)
    assert rc.conv_box(6, 6, 128) is None  # 36 pixels do not divide 128
    assert rc.conv_box(3, 64, 128) is None  # two rows a tile, three rows an image
    assert rc.conv_box(2, 300, 128) is None  # a row over TMA's 256
