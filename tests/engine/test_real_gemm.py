"""Real execution of a quantized Linear (qlip.quant.real_gemm): integer math for options of at
most 8 bits gives the exact product of the simulation's quantized operands (checked in float64),
float math for wider options; one launch whose choice is read on the device (run where Triton
can: on CUDA, or on the CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from qlip.quant import real_gemm as rg
from qlip.quant.stacked import StackedUniform
from qlip.quant.uniform import UniformQuantizer

from ..conftest import assert_same_epilogue, kernel_device, on

needs_kernel = pytest.mark.skipif(
    kernel_device() is None, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")

OPTIONS = (4, 6, 8, 16)


def _layer(wbits, n=40, k=72, steps=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.2
    wq = UniformQuantizer(wbits, channel_dim=0, num_channels=n)
    wq.calibrate(weight)
    codes = wq.quantize_codes(weight)
    acts = StackedUniform(OPTIONS, num_steps=steps)
    for bits in OPTIONS[:-1]:
        for step in range(steps or 1):
            acts.slot_view(bits).calibrate(torch.randn(4000, generator=g) * (1 + 0.3 * step) + 0.4,
                                           step=step if steps else None)
    scale, zero = wq.params()
    bias = torch.randn(n, generator=g)
    return acts, rg.weight_operands(codes, scale, zero, wbits), (codes, scale, zero), bias


def _simulated_exact(x, acts, choice, step, weights):
    """The simulation's quantized operands, multiplied in float64."""
    codes, scale, zero = weights
    xq = acts(x, torch.tensor([choice]), step=torch.tensor([step]) if acts.num_steps else None)
    wq = (codes.double() - zero.double()[:, None]) * scale.double()[:, None]
    return xq.double() @ wq.T


def test_weight_operands_center_codes_below_8_bits_and_shift_8_bit_ones_into_int8():
    codes = torch.tensor([[0.0, 255.0, 128.0]])
    w, w_sum, zero, scale = rg.weight_operands(codes, torch.tensor([0.5]), torch.tensor([130.0]), 8)
    assert w.tolist() == [[-128, 127, 0]] and w_sum.tolist() == [-1] and zero.tolist() == [2]
    assert rg.zero_mode(w, zero) == 2  # the full bracket, with the activations' row sums
    four = torch.tensor([[0.0, 15.0, 9.0]])
    w4, sum4, zero4, _ = rg.weight_operands(four, torch.ones(1), torch.tensor([7.0]), 4)
    assert w4.dtype == torch.int8 and w4.tolist() == [[-7, 8, 2]] and sum4.tolist() == [3]
    assert zero4 is None and rg.zero_mode(w4, zero4) == 0  # centered: no zero point left
    packed = rg.pack_rows(four)
    wp, sump, zerop, _ = rg.weight_operands(four, torch.ones(1), torch.tensor([7.0]), 4, packed)
    assert wp.data_ptr() == packed.data_ptr()  # the packed bytes themselves, no copy
    assert sump.tolist() == [3] and zerop.tolist() == [7] and rg.zero_mode(wp, zerop) == 1
    # a zero point whose centered codes leave int8: the full bracket, unpacked
    w7, _, zero7, _ = rg.weight_operands(torch.tensor([[0.0, 127.0]]), torch.ones(1),
                                         torch.tensor([-20.0]), 7)
    assert w7.tolist() == [[0, 127]] and zero7.tolist() == [-20] and rg.zero_mode(w7, zero7) == 2
    with pytest.raises(ValueError, match="at most 8 bits"):
        rg.weight_operands(codes, torch.ones(1), torch.zeros(1), 16)
    integer, offset = rg.int8_offsets((4, 8, 16, 32))
    assert integer.tolist() == [1, 1, 0, 0] and offset.tolist() == [0, 128, 0, 0]


# where the integer path's activation codes are rounded: once per call by real_gemm.int8_codes
# (the default), or inside every tile of the GEMM
ROUNDING = pytest.mark.parametrize("pre", [True, False], ids=["codes_first", "codes_in_tiles"])


@needs_kernel
@ROUNDING
@pytest.mark.parametrize("wbits", [4, 8])
@pytest.mark.parametrize("steps", [None, 3], ids=["one_row", "per_step"])
def test_integer_options_give_the_exact_product_of_the_quantized_operands(wbits, steps, pre,
                                                                          monkeypatch):
    monkeypatch.setattr(rg, "PREQUANTIZE", pre)
    device = kernel_device()
    acts, (w, w_sum, w_zero, w_scale), weights, bias = _layer(wbits, steps=steps)
    integer, offset = rg.int8_offsets(OPTIONS)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 23, 72, generator=g) + 0.4  # M = 69 rows: not a multiple of the tile
    table = acts._flat_table(torch.float32)
    for choice in range(len(OPTIONS)):
        for step in range(steps or 1):
            c, s = torch.tensor([choice]), torch.tensor([step])
            args = [t.to(device) for t in (x, table, c, s)] + [steps or 0] + [
                on(t, device) for t in (integer, offset, w, w_sum, w_zero, w_scale, bias)]
            got = rg.real_linear(*args).cpu().double()
            if OPTIONS[choice] <= 8:  # the simulation's operands, exactly: one fp32 rounding
                want = _simulated_exact(x, acts, choice, step, weights) + bias.double()
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-5), (choice, step)
                again = rg.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a
                                       for a in args]).double()
                assert torch.allclose(got, again, rtol=1e-6, atol=1e-5)
            else:  # A16: the layer in float math on the unquantized input
                wq = (weights[0].double() - weights[2].double()[:, None]) * weights[1].double()[:, None]
                want = x.double() @ wq.T + bias.double()
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (choice, step)


@needs_kernel
def test_k_past_the_exact_int32_range_is_refused():
    device = kernel_device()
    x = torch.zeros(2, rg.MAX_K + 1, device=device)
    with pytest.raises(ValueError, match="K ≤"):
        rg.real_linear(x, *([None] * 11))


@needs_kernel
def test_a_unet_with_real_layers_follows_the_bits(tiny_pipe, monkeypatch):
    """Every Linear and every conv runs for real at every option (1×1 convs as a GEMM, 3×3
    ones, the strided downsamplers too, as an implicit GEMM; a split-input conv as one product
    per part, added). Each real layer gives, on the input it got, the simulated layer's output
    up to fp32 rounding: at A4/A8 the exact product of the same quantized operands; at A16 and A32 the unquantized input times the dequantized weights (the
    simulation at A32, its bypass). The UNet's output follows the simulation's.

    Checked layer by layer because the UNet's output is not a fair test on CUDA: there the
    simulation's fp32 rounding (and cuDNN's TF32 convolutions, turned off here) shifts an
    occasional activation across an A8 grid step downstream, a whole Δ at once (an H100 showed
    0.027 at the output from one 1×1 conv whose own output was within 5e-7)."""
    from qlip.nn import QuantConfig, QuantConv2d, QuantLinear, use_real_execution

    from ..conftest import kernel_unet

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet, units, calls, (x, t, c) = kernel_unet(
        tiny_pipe, monkeypatch, QuantConfig(wbits=8, abits=8, abits_options=(4, 8, 16, 32)),
        spy=(rg, "real_linear"))
    _spy_conv(monkeypatch, calls)
    switched = use_real_execution(unet)
    real_layers = [m for m in unet.modules() if getattr(m, "_real", None) is not None]
    assert len(real_layers) == switched
    assert any(isinstance(m, QuantLinear) for m in real_layers)
    kernels = {m.kernel_size for m in real_layers if isinstance(m, QuantConv2d)}
    assert kernels == {(1, 1), (3, 3)}  # 1×1 convs as GEMMs, 3×3 as implicit GEMMs
    strided = [m for m in unet.modules() if isinstance(m, QuantConv2d) and m.stride != (1, 1)]
    assert strided and all(m in real_layers for m in strided)  # the downsamplers too
    split = [m for m in unet.modules() if isinstance(m, QuantConv2d) and len(m.splits) > 1]
    assert split and all(m in real_layers for m in split)  # and the split-input convs, a
    # product per part (the up blocks' cat([h, skip]), each part its own grid)
    seen = {}
    for layer in real_layers:
        layer.register_forward_hook(lambda m, args, out: seen.__setitem__(m, (args[0], out)))

    def run(bits, real_layers_at=None):
        for unit in units.values():
            unit.set_bits(real_layers_at if real_layers_at and unit in real_layers else bits)
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=c).sample

    for bits in (4, 8, 16, 32):
        use_real_execution(unet, False)
        # A16: the real layers' inputs unquantized (the simulation at A32 there, A16 elsewhere)
        simulated = run(bits, real_layers_at=32 if bits == 16 else None)
        use_real_execution(unet)
        calls.clear()
        seen.clear()
        real = run(bits)
        # every switched layer ran for real, at every option (a launch per input part)
        assert len(calls) == sum(len(m.splits) for m in real_layers)
        got = dict(seen)
        use_real_execution(unet, False)
        for unit in units.values():  # above 8 bits real layers take their input unquantized
            unit.set_bits(bits if bits <= 8 else 32)
        with torch.no_grad():
            for layer, (inp, out) in got.items():
                want = layer(inp)
                assert (out - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, (bits, layer)
        off = (real - simulated).abs().mean()
        if bits > 8 or not real.is_cuda:  # float math, or the interpreter's exact rounding
            assert off < 1e-4, bits
        else:  # on CUDA an early A8 code flip carries through the rest of an image (see above):
            # an H200 gave 0.0034 at A8, the printed differences within 1e-7 in one image and
            # about 1e-2 in the other, against the 0.0145 that A8 moves this UNet from A32
            # (measured on the CPU). So the
            # real UNet must stay nearer the simulation at its bits than half of what the
            # quantization moves (a kernel that skipped the quantization would be that far)
            moved = (simulated - run(32)).abs().mean()  # (real execution is off here)
            assert off < 0.5 * moved, (bits, float(off), float(moved))
    # a per-image choice takes the simulation
    use_real_execution(unet)
    for unit in units.values():
        unit.set_bits(torch.tensor([4, 8]))
    calls.clear()
    with torch.no_grad():
        unet(torch.cat([x[:1], x[:1]]), t, encoder_hidden_states=c)
    assert not calls


def _spy_conv(monkeypatch, calls):
    """Count real_conv2d's launches into ``calls`` too."""
    from qlip.quant import real_conv

    original = real_conv.real_conv2d
    monkeypatch.setattr(real_conv, "real_conv2d",
                        lambda *a, **k: calls.append(1) or original(*a, **k))


def test_rows_pack_two_codes_a_byte_and_unpack():
    codes = torch.tensor([[1, 15, 7], [0, 3, 9]])
    packed = rg.pack_rows(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[1 | 15 << 4, 7], [0 | 3 << 4, 9]]
    assert torch.equal(rg.unpack_rows(packed, 3), codes.int())
    with pytest.raises(ValueError, match="4 bits"):
        rg.pack_rows(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError, match="at most 4 bits"):  # 8-bit codes cannot come packed
        rg.weight_operands(codes, torch.ones(2), torch.zeros(2), 8, packed=packed)
    with pytest.raises(ValueError, match=r"\[N, ceil\(K/2\)\]"):
        rg.weight_operands(codes, torch.ones(2), torch.zeros(2), 4, packed=packed[:, :1])


@needs_kernel
@ROUNDING
@pytest.mark.parametrize("k", [72, 71], ids=["even_k", "odd_k"])
def test_packed_weights_give_the_int8_codes_product(k, pre, monkeypatch):
    """The packed path multiplies the same integer codes: bit for bit the int8 path's output at
    integer options, the same float math at A16. So does the full bracket (uncentered codes,
    the zero point's terms with the activations' row sums), which 8-bit weights take."""
    monkeypatch.setattr(rg, "PREQUANTIZE", pre)
    device = kernel_device()
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (40, k), generator=g)
    scale, zero = torch.rand(40, generator=g) * 0.05 + 0.01, torch.randint(4, 12, (40,)).float()
    plain = rg.weight_operands(codes, scale, zero, 4)
    packed = rg.weight_operands(codes, scale, zero, 4, packed=rg.pack_rows(codes))
    assert packed[0].shape == (40, (k + 1) // 2) and torch.equal(packed[1], plain[1])
    full = (codes.to(torch.int8), codes.sum(1).int(), zero.int(), scale)  # zero_mode 2
    acts = StackedUniform(OPTIONS, num_steps=None)
    for bits in OPTIONS[:-1]:
        acts.slot_view(bits).calibrate(torch.randn(4000, generator=g) + 0.4)
    integer, offset = rg.int8_offsets(OPTIONS)
    x, bias = torch.randn(3, 23, k, generator=g) + 0.4, torch.randn(40, generator=g)
    table = acts._flat_table(torch.float32)
    for choice in range(len(OPTIONS)):
        head = [t.to(device) for t in (x, table, torch.tensor([choice]), torch.tensor([0]))] + [0]
        ints = [t.to(device) for t in (integer, offset)]
        got = rg.real_linear(*head, *ints, *(on(t, device) for t in packed), bias.to(device))
        want = rg.real_linear(*head, *ints, *(on(t, device) for t in plain), bias.to(device))
        bracket = rg.real_linear(*head, *ints, *(on(t, device) for t in full), bias.to(device))
        if OPTIONS[choice] <= 8:
            assert torch.equal(got, want) and torch.equal(bracket, want), choice
        else:
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), choice
        again = rg.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in head],
                             integer, offset, *packed, bias)
        assert torch.allclose(got.cpu(), again, rtol=1e-5, atol=1e-4), choice


@needs_kernel
def test_a_packed_unet_runs_for_real_on_its_own_bytes(tiny_pipe, monkeypatch):
    """pack_weights + real execution: the layers read the packed buffer itself (no second copy
    of the codes; a 3×3 conv's nibbles tap-major, as its kernel reads them) and give the
    unpacked real model's output, at every option."""
    from qlip.nn import QuantConfig, QuantLayer, pack_weights, use_real_execution

    from ..conftest import kernel_unet

    unet, units, calls, (x, t, c) = kernel_unet(
        tiny_pipe, monkeypatch, QuantConfig(wbits=4, abits=8, abits_options=(4, 8, 16)),
        spy=(rg, "real_linear"))
    _spy_conv(monkeypatch, calls)
    switched = use_real_execution(unet)
    outputs = {}
    for bits in (4, 8, 16):
        for unit in units.values():
            unit.set_bits(bits)
        with torch.no_grad():
            outputs[bits] = unet(x, t, encoder_hidden_states=c).sample
    packed = pack_weights(unet)
    assert packed > 0
    linears = [m for m in unet.modules() if isinstance(m, QuantLayer) and m._real is not None]
    assert len(linears) == switched
    for layer in (m for m in linears if m.packed):
        codes = layer._real[2]
        assert codes.dtype == torch.uint8  # the packed kernel, on the layer's own storage
        for index, part in enumerate(layer._real_parts):  # each input part's own bytes
            if layer.weight_codes()[index].flatten(1).shape[1] % 2 == 0:
                own = layer._buffers[f"weight_nibbles_{index}"]
                assert part[2].untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
        assert layer._real_tap_major == (layer.real_kind() == "conv"
                                         and tuple(layer.kernel_size) != (1, 1))
    def same_outputs(counted: list, launches: int) -> None:
        for bits in (4, 8, 16):
            for unit in units.values():
                unit.set_bits(bits)
            counted.clear()
            with torch.no_grad():
                got = unet(x, t, encoder_hidden_states=c).sample
            assert len(counted) == launches, bits
            if bits <= 8:  # the same integers, the same fp32 scaling
                assert torch.equal(got, outputs[bits]), bits
            else:  # float math, on a GPU perhaps summed in another order (the packed kernel
                # tunes its own tiles), carried through the UNet (each layer alone agrees to
                # 1e-5, above)
                assert (got - outputs[bits]).abs().max() < 1e-3, bits

    # UNPACK_PACKED off: the kernels unpack each tile's bytes in registers
    monkeypatch.setattr(rg, "UNPACK_PACKED", False)
    same_outputs(calls, sum(len(m.splits) for m in linears))  # a launch per input part
    # UNPACK_PACKED (the default): each launch unpacks its bytes first (one kernel) for the
    # unpacked kernels: the same integers again, the same bytes kept
    monkeypatch.setattr(rg, "UNPACK_PACKED", True)
    unpacks = []
    monkeypatch.setattr(rg, "unpack_centered",
                        lambda *a, _f=rg.unpack_centered: unpacks.append(1) or _f(*a))
    same_outputs(unpacks, sum(len(m.splits) for m in linears if m.packed))


def test_launch_takes_the_first_tile_unless_autotuning_is_on(monkeypatch):
    """QLIP_AUTOTUNE=0 (and the interpreter) launch the kernel itself at tiles[0] with that
    tile's blocks; otherwise the autotuned wrapper gets the launch, its grid a function of the
    tile it picks."""
    from types import SimpleNamespace

    from qlip.quant import fused_quantize

    launched = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((self.name, grid, args, kw))

    monkeypatch.setattr(rg, "triton", SimpleNamespace(cdiv=lambda a, b: -(-a // b)))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiles = [(32, 64, 64, 4, 2), (128, 128, 64, 8, 3)]
    for env, fixed in (("0", True), ("1", False)):
        monkeypatch.setenv("QLIP_AUTOTUNE", env)
        assert fused_quantize.fixed_tile() is fixed
        launched.clear()
        rg.launch(Fake("kernel"), Fake("tuned"), tiles, 100, 130, ("x",), {"IEEE": True})
        [(name, grid, args, kw)] = launched
        assert args == ("x",)
        if fixed:
            assert name == "kernel" and grid == (4, 3)
            assert kw == {"IEEE": True, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}
        else:
            assert name == "tuned" and kw == {"IEEE": True}
            assert grid({"BLOCK_M": 128, "BLOCK_N": 128}) == (1, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter cannot time: always fixed
    assert fused_quantize.fixed_tile()


def test_the_real_kernels_are_operators_with_the_shapes_a_compiled_graph_needs():
    """torch.compile traces the kernels as custom operators: their fake implementations give the
    output's shape, dtype and layout (a Linear's ``[..., N]``; a conv's channels-last
    ``[B, N, H_out, W_out]``) without running anything, and the checks before the launch (in
    the functions that choose the operator or the direct launch) still refuse what the kernel
    cannot take."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qlip.quant import real_conv as rc

    def side(n):
        return (torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.int32),
                torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32),
                torch.empty(n), torch.empty(n))
    with FakeTensorMode():
        integer, offset, w_sum, w_zero, w_scale, bias = side(40)
        one = torch.zeros(1, dtype=torch.long)
        x = torch.empty(2, 5, 72, dtype=torch.bfloat16)
        for w in (torch.empty(40, 72, dtype=torch.int8), torch.empty(40, 36, dtype=torch.uint8)):
            out = torch.ops.qlip.real_linear(x, None, torch.empty(4, 3), one, one, 0, integer,
                                             offset, w, w_sum, w_zero, w_scale, bias)
            assert out.shape == (2, 5, 40) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="do not hold K = 72"):
            rg.real_linear(x, torch.empty(4, 3), one, one, 0, integer, offset,
                           torch.empty(40, 35, dtype=torch.uint8), w_sum, w_zero, w_scale, bias)
        image = torch.empty(2, 8, 6, 5)
        out = torch.ops.qlip.real_conv2d(image, None, torch.empty(4, 3), one, one, 0, integer,
                                         offset, torch.empty(40, 72, dtype=torch.int8), w_sum,
                                         w_zero, w_scale, None, [3, 3], [1, 0], True, [1, 1])
        assert out.shape == (2, 40, 6, 3)
        assert out.is_contiguous(memory_format=torch.channels_last)  # as the kernel writes it
        out = torch.ops.qlip.real_conv2d(image, None, torch.empty(4, 3), one, one, 0, integer,
                                         offset, torch.empty(40, 72, dtype=torch.int8), w_sum,
                                         w_zero, w_scale, None, [3, 3], [1, 1], True, [2, 2])
        assert out.shape == (2, 40, 3, 3)  # a downsampler's: ⌊(6+2−3)/2⌋ + 1, ⌊(5+2−3)/2⌋ + 1
        with pytest.raises(ValueError, match="do not hold K = 72"):
            rc.real_conv2d(image, torch.empty(4, 3), one, one, 0, integer, offset,
                           torch.empty(40, 71, dtype=torch.int8), w_sum, w_zero, w_scale, None,
                           kernel_size=(3, 3), padding=(1, 0))
    schema = str(torch.ops.qlip.real_linear.default._schema)
    assert "Tensor? a" in schema and "Tensor? bias" in schema and "SymInt steps" in schema


@needs_kernel
def test_a_compiled_unet_keeps_the_real_kernels_and_follows_the_bits(tiny_pipe, monkeypatch):
    """Under torch.compile the real layers stay real: every switched layer is one call of the
    custom operator in the traced graph (no graph break), the compiled model gives the eager
    real model's output at every option, and changing the bits recompiles nothing."""
    from qlip.nn import QuantConfig, use_real_execution
    from qlip.testing import step_at_bits

    from ..conftest import kernel_unet

    unet, units, _, (x, t, c) = kernel_unet(
        tiny_pipe, monkeypatch, QuantConfig(wbits=4, abits=8, abits_options=(4, 8, 16)))
    switched = use_real_execution(unet)
    graphs = []

    def recording(gm, example_inputs):  # a backend that keeps the graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    def run(fn, bits):
        return step_at_bits(fn, units, bits, x, t, c)

    eager = {bits: run(unet, bits) for bits in (4, 8, 16)}
    torch._dynamo.reset()
    compiled = torch.compile(unet.forward, backend=recording, fullgraph=True)
    first = run(compiled, 4)
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    real_calls = [n for n in nodes if "qlip.real_" in str(n.target)]
    parts = sum(len(m.splits) for m in unet.modules() if getattr(m, "_real", None) is not None)
    assert len(real_calls) == parts > switched > 0  # a call per input part
    # every real layer's int8 codes are PyTorch ops of the graph (rg.CODES_IN_GRAPH), for
    # Inductor to fuse into the op that produces the layer's input
    assert all(n.args[1] is not None for n in real_calls)
    # A16 is float math: the kernel may read x, so every call gets x itself (its first operand),
    # and the layer's dequantized weights (w_float), which that math reads
    assert all(n.args[0] is not None and _w_float_arg(n) is not None for n in real_calls)
    assert torch.allclose(first, eager[4], rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):
        for bits in (8, 16, 4):
            got = run(compiled, bits)
            if bits <= 8:  # the same integers in every real layer
                assert torch.allclose(got, eager[bits], rtol=1e-5, atol=1e-5), bits
            else:  # float math: the eager and the traced element-wise ops round differently,
                # carried through the UNet (4e-5 here)
                assert (got - eager[bits]).abs().max() < 1e-3, bits
    assert len(graphs) == 1
    torch._dynamo.reset()


@needs_kernel
def test_a_compiled_integer_only_layer_hands_over_its_codes_and_not_its_input(tiny_pipe,
                                                                               monkeypatch):
    """Where every option of a layer is integer math (the bank {4, 8}), the kernel never reads x:
    a compiled graph gives the operator x's codes and no x (None), so that x's only consumer is
    the codes ops and Inductor need not write it. (A one-element stand-in of x's shape, the
    seventeenth session's, cost a one-element kernel a layer under Inductor.) The kernel's x
    pointer is then the output buffer, never read. The outputs stay the eager real model's."""
    from qlip.nn import QuantConfig, use_real_execution
    from qlip.testing import step_at_bits

    from ..conftest import kernel_unet

    unet, units, _, (x, t, c) = kernel_unet(
        tiny_pipe, monkeypatch, QuantConfig(wbits=4, abits=8, abits_options=(4, 8)))
    assert use_real_execution(unet) > 0
    graphs, seen = [], []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    from qlip.quant import real_conv as rc

    def spy(original):  # what each launch hands the kernel as x (its first operand)
        def launch(kernel, tuned, tiles, m, n, operands, flags):
            seen.append((operands[0] is operands[3], flags["PRE"]))  # x pointer = the output's
            return original(kernel, tuned, tiles, m, n, operands, flags)
        return launch
    monkeypatch.setattr(rg, "launch", spy(rg.launch))
    monkeypatch.setattr(rc, "launch", spy(rc.launch))
    eager = {bits: step_at_bits(unet, units, bits, x, t, c) for bits in (4, 8)}
    assert seen and not any(is_out for is_out, _ in seen)  # eager: x (the codes kernel's)
    torch._dynamo.reset()
    compiled = torch.compile(unet.forward, backend=recording, fullgraph=True)
    seen.clear()
    for bits in (4, 8):
        got = step_at_bits(compiled, units, bits, x, t, c)
        assert torch.allclose(got, eager[bits], rtol=1e-5, atol=1e-5), bits
    real_calls = [n for n in graphs[0].graph.nodes
                  if n.op == "call_function" and "qlip.real_" in str(n.target)]
    # no x (None), and no float weights kept (w_float None)
    assert real_calls and all(n.args[0] is None and _w_float_arg(n) is None for n in real_calls)
    # the operators ran on the codes alone, the kernels' x pointer the output's
    assert len(seen) >= 2 * len(real_calls)
    assert all(is_out and pre for is_out, pre in seen)
    torch._dynamo.reset()


def _w_float_arg(node):
    """The ``w_float`` operand of a traced real operator's call (real_linear: after the bias;
    real_conv2d: after the kernel size, padding, tap order and stride)."""
    return node.args[13] if "real_linear" in str(node.target) else node.args[17]


def test_a_missing_input_needs_its_codes():
    """x may be left out only where the codes come with it: the codes kernel would read x."""
    from qlip.quant import real_conv as rc

    with pytest.raises(ValueError, match="needs its codes"):
        rg._launch_linear(None, None, *([None] * 11))
    with pytest.raises(ValueError, match="needs its codes"):
        rc._launch_conv2d(None, None, *([None] * 11), [3, 3], [1, 1], True, [1, 1])


def test_the_operators_shapes_come_from_the_codes_when_x_is_left_out():
    """The fake implementations (what torch.compile traces) give the output of the codes alone
    the shape and dtype x would give: a Linear's codes have x's shape; a conv's are padded NHWC."""
    from qlip.quant import real_conv as rc

    with torch._subclasses.fake_tensor.FakeTensorMode():
        ft = torch.empty(2, 3, dtype=torch.bfloat16)  # the table, in x's dtype
        fw = torch.empty(6, 8, dtype=torch.int8)
        fx = torch.empty(2, 5, 8, dtype=torch.bfloat16)
        fa = torch.empty(2, 5, 8, dtype=torch.int8)
        rest = (None, None, 0, None, None, fw, None, None, None, None)
        with_x = torch.ops.qlip.real_linear(fx, fa, ft, *rest)
        alone = torch.ops.qlip.real_linear(None, fa, ft, *rest)
        assert alone.shape == with_x.shape == (2, 5, 6) and alone.dtype == torch.bfloat16
        image = torch.empty(2, 4, 7, 9, dtype=torch.bfloat16)
        codes = torch.empty(2, 9, 11, 4, dtype=torch.int8)  # padded by (1, 1)
        cw = torch.empty(6, 36, dtype=torch.int8)
        conv = (ft, None, None, 0, None, None, cw, None, None, None, None, [3, 3], [1, 1], True)
        for stride in ([1, 1], [2, 2]):
            got = torch.ops.qlip.real_conv2d(None, codes, *conv, stride)
            want = torch.ops.qlip.real_conv2d(image, codes, *conv, stride)
            assert got.shape == want.shape and got.stride() == want.stride()
            assert got.dtype == torch.bfloat16
    assert rc._input_shape(None, torch.empty(2, 9, 11, 4), (1, 1)) == (2, 4, 7, 9)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_codes_are_the_codes_kernels_integers(dtype):
    """The codes a compiled graph computes in PyTorch ops (rg.graph_codes) are, run eagerly, the
    codes kernels' integers: a Linear's, and a conv's padded NHWC codes (the border the code
    0), at every integer option and per-step row."""
    from qlip.quant import real_conv as rc

    device = kernel_device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest)")
    acts, *_ = _layer(4, steps=3)
    table = acts._flat_table(dtype).to(device)
    integer, offset = (t.to(device) for t in rg.int8_offsets(OPTIONS))
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 5, 6, 16, generator=g) * 3).to(dtype).to(device)  # NHWC
    for choice in range(len(OPTIONS) - 1):  # the integer options
        for step in range(3):
            c, s = torch.tensor([choice], device=device), torch.tensor([step], device=device)
            assert torch.equal(rg.graph_codes(x, table, c, s, 3, offset),
                               rg.int8_codes(x, table, c, s, 3, integer, offset)), (choice, step)
            assert torch.equal(rg.graph_codes(x, table, c, s, 3, offset, (1, 2)),
                               rc.padded_codes(x, table, c, s, 3, integer, offset, (1, 2)))


def test_float_weights_are_the_dequantized_codes_rounded_once_to_the_dtype():
    """The copy a float option reads (real_gemm.float_weights): the codes less their zero point,
    times the scale in fp32, then rounded once, as the kernels' float math dequantizes a tile."""
    codes = torch.tensor([[0.0, 255.0, 128.0], [3.0, 4.0, 5.0]])
    scale = torch.tensor([0.013, 0.5])
    w, _, w_zero, w_scale = rg.weight_operands(codes, scale, torch.tensor([130.0, 4.0]), 8)
    for dtype in (torch.float32, torch.bfloat16):
        got = rg.float_weights(w, w_zero, w_scale, dtype)
        want = ((codes - torch.tensor([130.0, 4.0])[:, None]) * scale[:, None]).to(dtype)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)
    w4, _, zero4, scale4 = rg.weight_operands(codes[1:] - 3, scale[1:], torch.tensor([1.0]), 4)
    assert zero4 is None  # centered codes: nothing left to subtract
    assert rg.float_weights(w4, zero4, scale4, torch.float32).tolist() == [[-0.5, 0.0, 0.5]]
    with pytest.raises(ValueError, match="packed"):
        rg.float_weights(rg.pack_rows(codes[1:]), torch.tensor([4]), scale[1:], torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=(
    pytest.mark.skipif(kernel_device() != "cuda", reason="Triton's interpreter misreads bf16")))],
    ids=["fp32", "bf16"])
@pytest.mark.parametrize("wbits", [4, 8])
def test_float_options_read_the_stored_float_weights_to_the_same_output(wbits, dtype):
    """Given the dequantized weights (``w_float``), the float options (A16) read them instead of
    dequantizing the codes in each tile, to the same output; the integer options are untouched
    (the same exact product). A copy of the wrong shape or dtype is refused before any work."""
    device = kernel_device()
    acts, (w, w_sum, w_zero, w_scale), _, bias = _layer(wbits)
    integer, offset = rg.int8_offsets(OPTIONS)
    x = (torch.randn(3, 23, 72, generator=torch.Generator().manual_seed(7)) + 0.4).to(dtype)
    table = acts._flat_table(dtype)
    w_float = rg.float_weights(w, w_zero, w_scale, dtype)
    for choice in range(len(OPTIONS)):
        args = [t.to(device) for t in (x, table, torch.tensor([choice]), torch.tensor([0]))] + [
            0] + [on(t, device) for t in (integer, offset, w, w_sum, w_zero, w_scale,
                                          bias.to(dtype))]
        plain = rg.real_linear(*args).cpu()
        stored = rg.real_linear(*args, w_float=w_float.to(device)).cpu()
        assert torch.equal(stored, plain), OPTIONS[choice]
    with pytest.raises(ValueError, match="w_float must be"):
        rg.real_linear(*args, w_float=w_float[:, :10].to(device))
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ValueError, match="w_float must be"):
        rg.real_linear(*args, w_float=w_float.to(device, other))


@pytest.mark.parametrize("options", [(8, 16), (4, 8)], ids=["a8_a16", "integer_only"])
def test_real_layers_keep_float_weights_only_where_an_option_runs_in_float_math(tiny_pipe,
                                                                               options):
    """use_real: a layer with float options beside its integer ones (QLIP's A16 beside A8)
    keeps its dequantized weights once, in the codes' order (a 3×3 conv's tap-major), equal to
    the simulation's; a layer whose every option is integer math keeps none."""
    from qlip.methods.calib_data import CalibrationSet
    from qlip.methods.rtn import quantize_rtn
    from qlip.nn import QuantConfig, QuantLayer, use_real_execution
    from qlip.pipeline import prepare_unet
    from qlip.quant import real_conv as rc

    from ..conftest import unet_inputs

    unet = tiny_pipe.unet
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=options))
    x, t, c = unet_inputs(unet, 4, seed=1)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(4, dtype=torch.long)),
                 progress=False)
    assert use_real_execution(unet) > 0
    layers = [m for m in unet.modules() if isinstance(m, QuantLayer) and m._real is not None]
    assert layers and all(len(m._real_float) == len(m._real_parts) for m in layers)
    if options == (4, 8):
        assert all(f is None for m in layers for f in m._real_float)
        return
    checked = 0
    for m in layers:
        assert all(f is not None and f.dtype == m.weight.dtype for f in m._real_float)
        if len(m.splits) > 1:
            continue
        want = m.compute_quantized_weight().flatten(1)
        if m._real_tap_major:
            want = rc.tap_major_rows(want, m.kernel_size)
        assert torch.equal(m._real_float[0], want), m
        checked += 1
    assert checked > 10
    use_real_execution(unet, False)
    assert all(m._real_float is None for m in layers)
    # float_weights=False: the memory kept instead, also when a layer rebuilds its operands
    use_real_execution(unet, float_weights=False)
    layers[0].refresh_weight()
    assert all(f is None for m in layers for f in m._real_float)


@needs_kernel
@pytest.mark.parametrize("steps", [None, 3], ids=["one_row", "per_step"])
@pytest.mark.parametrize("bias_on", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["int8", "packed"])
def test_the_persistent_kernel_gives_the_same_integer_product(steps, bias_on, packed,
                                                              monkeypatch):
    """An integer-only layer through the persistent TMA kernel (rg.PERSISTENT): the same bits
    as the one-tile-a-program kernel at every integer option and step row, with M, N and K off
    the tiles (TMA's zero fill at the edges), and more tiles than programs (each program walks
    several: 4 × 3 tiles of 64 × 64, N = 136, over the interpreter's 4 programs); on packed
    codes too (K = 96: rows of 48 bytes), centered in registers. Codes its descriptors cannot
    address (K not a multiple of 16) take the other kernel."""
    device = kernel_device()
    acts, (w, w_sum, w_zero, w_scale), (codes, scale, zero), bias = _layer(
        4, n=136, k=96 if packed else 80, steps=steps)
    if packed:
        w, w_sum, w_zero, w_scale = rg.weight_operands(codes, scale, zero, 4,
                                                       packed=rg.pack_rows(codes))
        assert w.dtype == torch.uint8 and w_zero is not None
    integer, offset = rg.int8_offsets(OPTIONS)
    x = torch.randn(4, 50, 96 if packed else 80, generator=torch.Generator().manual_seed(9)) + 0.4
    table = acts._flat_table(torch.float32)
    taken = []
    original = rg._launch_persistent
    monkeypatch.setattr(rg, "_launch_persistent", lambda *a: taken.append(1) or original(*a))
    for choice in range(3):  # the integer options: 4, 6, 8 bits
        for step in range(steps or 1):
            args = [t.to(device) for t in (x, table, torch.tensor([choice]), torch.tensor([step]))]
            args += [steps or 0] + [on(t, device) for t in (integer, offset, w, w_sum, w_zero,
                                                            w_scale, bias if bias_on else None)]
            monkeypatch.setattr(rg, "PERSISTENT", False)
            plain = rg.real_linear(*args, integer_only=True).cpu()
            monkeypatch.setattr(rg, "PERSISTENT", True)
            before = len(taken)
            persistent = rg.real_linear(*args, integer_only=True).cpu()
            assert len(taken) == before + 1
            assert_same_epilogue(persistent, plain, bias_on, device)
    acts, (w, w_sum, w_zero, w_scale), _, bias = _layer(4, n=136, k=72)  # K = 72: not for TMA
    args = [t.to(device) for t in (x[..., :72], acts._flat_table(torch.float32),
                                    torch.tensor([0]), torch.tensor([0]))]
    args += [0] + [on(t, device) for t in (integer, offset, w, w_sum, w_zero, w_scale, bias)]
    before = len(taken)
    rg.real_linear(*args, integer_only=True)
    assert len(taken) == before


@needs_kernel
def test_by_default_the_persistent_kernel_runs_only_while_a_graph_is_captured(monkeypatch):
    """rg.PERSISTENT None (the default): an integer-only layer takes the persistent kernel only
    while a CUDA graph is being captured (the host's descriptor work done once, not at every
    call), with the tile persistent_tile gives for its N, no autotune (a capture cannot time
    candidates); outside a capture the one-tile kernel. Both give the same bits."""
    device = kernel_device()
    acts, (w, w_sum, w_zero, w_scale), _, bias = _layer(4, n=136, k=80)
    integer, offset = rg.int8_offsets(OPTIONS)
    x = torch.randn(2, 40, 80, generator=torch.Generator().manual_seed(3)) + 0.4
    args = [t.to(device) for t in (x, acts._flat_table(torch.float32), torch.tensor([1]),
                                    torch.tensor([0]))]
    args += [0] + [on(t, device) for t in (integer, offset, w, w_sum, w_zero, w_scale, bias)]
    tiles = []

    class Spy:  # the kernel, launched as kernel[grid](...), its tile recorded
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **kw):
                tiles.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]))
                return self.kernel[grid](*a, **kw)
            return launch

    monkeypatch.setattr(rg, "_persistent_linear_kernel", Spy(rg._persistent_linear_kernel))
    monkeypatch.setattr(rg, "_persistent_tuned", None)  # autotune must not be reached
    monkeypatch.setattr(rg, "PERSISTENT", None)
    plain = rg.real_linear(*args, integer_only=True).cpu()
    assert not tiles  # not capturing: the one-tile kernel
    monkeypatch.setattr(rg, "capturing", lambda t: True)
    fixed_tile = rg.fixed_tile
    monkeypatch.setattr(rg, "fixed_tile", lambda: False)  # as on a GPU, where autotune is on
    captured = rg.real_linear(*args, integer_only=True).cpu()
    assert tiles == [rg.PERSISTENT_NARROW[:3]]
    assert_same_epilogue(captured, plain, True, device)
    monkeypatch.setattr(rg, "fixed_tile", fixed_tile)
    monkeypatch.setattr(rg, "PERSISTENT", False)  # never, capture or not
    rg.real_linear(*args, integer_only=True)
    assert len(tiles) == 1
    assert rg.persistent_tile(2560) == rg.PERSISTENT_WIDE
    assert rg.persistent_tile(320) == rg.PERSISTENT_NARROW
