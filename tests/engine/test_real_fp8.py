"""fp8 execution of A8 GEMMs (qlip.quant.real_fp8): the weights exact in e4m3, the activations
an fp8 quantizer over the A8 grid's range, the product torch._scaled_mm's. torch runs it on the
CPU as well, so these tests need no GPU; on CUDA they check cuBLASLt's kernel the same way."""

import pytest
import torch

from qlip.quant import real_fp8 as rf
from qlip.quant import real_gemm as rg
from qlip.quant.stacked import StackedUniform
from qlip.quant.uniform import UniformQuantizer

from ..conftest import kernel_device


def _device():
    return "cuda" if torch.cuda.is_available() and rf.supported("cuda") else "cpu"


def _layer(wbits=4, n=48, k=64, steps=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.2
    wq = UniformQuantizer(wbits, channel_dim=0, num_channels=n)
    wq.calibrate(weight)
    codes = wq.quantize_codes(weight)
    acts = StackedUniform((8,), num_steps=steps)
    for step in range(steps or 1):
        acts.slot_view(8).calibrate(torch.randn(4000, generator=g) * (1 + step) + 0.4,
                                    step=step if steps else None)
    scale, zero = wq.params()
    return acts, rg.weight_operands(codes, scale, zero, wbits), (codes, scale, zero)


def test_w4_weights_are_exact_in_e4m3_and_wider_or_odd_shapes_are_refused():
    _, (w, _, w_zero, w_scale), (codes, scale, zero) = _layer(4)
    w8, scale_b, none = rf.fp8_weights(w, w_zero, w_scale)
    assert w8.dtype == torch.float8_e4m3fn and scale_b.shape == (1, 48) and none is None
    centered = codes.float() - zero.round().float()[:, None]
    assert centered.abs().max() > 7  # asymmetric codes: centered beyond int4's range
    assert torch.equal(w8.float(), centered)  # every code exact
    assert torch.equal(scale_b[0], scale.reshape(-1).float())
    _, (w, _, w_zero, w_scale), _ = _layer(8)  # 8-bit codes are not exact in e4m3
    assert rf.fp8_weights(w, w_zero, w_scale) is None
    _, (w, _, w_zero, w_scale), _ = _layer(4, n=40)  # N not a multiple of 16
    assert rf.fp8_weights(w, w_zero, w_scale) is None


@pytest.mark.parametrize("steps", [None, 3], ids=["one_row", "per_step"])
def test_the_fp8_product_is_its_operands_product_and_follows_the_steps_table(steps):
    device = _device()
    acts, (w, _, w_zero, w_scale), (codes, scale, zero) = _layer(4, steps=steps)
    w8, scale_b = (t.to(device) for t in rf.fp8_weights(w, w_zero, w_scale)[:2])
    table = acts._flat_table(torch.float32).to(device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 30, 64, generator=g) * 2 + 0.4).to(device)
    x[0, 0, :4] = torch.tensor([1e3, -1e3, 0.0, 1e-6])  # clipped both ways; zero; tiny
    bias = torch.randn(48, generator=g).to(device)
    choice = torch.tensor([0], device=device)
    wq = ((codes.double() - zero.round().double()[:, None]) * scale.double()[:, None]).to(device)
    outs = []
    for s in range(steps or 1):
        step = torch.tensor([s], device=device)
        got = rf.fp8_linear(x, table, choice, step, steps or 0, w8, scale_b, None, bias)
        want = rf.fp8_reference(x, table, choice, step, steps or 0, w8, scale_b, None, bias)
        assert got.shape == (2, 30, 48) and got.dtype == x.dtype
        # (Hopper's fp8 tensor cores accumulate with about 14 bits: an H100 was 9e-5 off)
        tol = 5e-4 if x.is_cuda else 1e-5
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
        # the clipping is the A8 grid's, and values in range keep about 2^-4 of their size
        xq = acts(x.cpu(), torch.tensor([0]), step=torch.tensor([s]) if steps else None)
        exact_int = xq.double().to(device) @ wq.T + bias.double()
        rel = (want - exact_int).norm() / exact_int.norm()
        assert 1e-4 < rel < 0.06, float(rel)  # a different quantizer, near the integer one
        outs.append(got)
    if steps:  # each step its own grid: another scale, another output
        assert not torch.allclose(outs[0], outs[1])


def test_packed_codes_give_the_same_fp8_product_from_a_quarter_of_the_bytes():
    """Packed 4-bit codes as fp8 operands: the bytes themselves and their zero points, unpacked
    at every call to the same exact e4m3 matrix, so the same product bit for bit."""
    device = _device()
    acts, (w, _, w_zero, w_scale), (codes, scale, zero) = _layer(4, k=64)
    packed_ops = rg.weight_operands(codes, scale, zero, 4, packed=rg.pack_rows(codes))
    packed, scale_p, zero_p = rf.fp8_weights(packed_ops[0], packed_ops[2], packed_ops[3], k=64)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32)  # no e4m3 copy kept
    w8, scale_b, _ = rf.fp8_weights(w, w_zero, w_scale)
    assert torch.equal(rf.fp8_weight_matrix(packed, zero_p, 64).float(), w8.float())
    assert torch.equal(scale_p, scale_b)
    table = acts._flat_table(torch.float32).to(device)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(4)).to(device)
    one = torch.tensor([0], device=device)
    plain = rf.fp8_linear(x, table, one, one, 0, w8.to(device), scale_b.to(device), None, None)
    got = rf.fp8_linear(x, table, one, one, 0, packed.to(device), scale_p.to(device),
                        zero_p.to(device), None)
    assert torch.equal(got, plain)
    with pytest.raises(ValueError, match="need their K"):
        rf.fp8_weights(packed_ops[0], packed_ops[2], packed_ops[3])
    assert rf.fp8_weights(packed_ops[0][:40], packed_ops[2][:40], packed_ops[3][:40],
                          k=64) is None  # N = 40: not for torch._scaled_mm


@pytest.mark.skipif(kernel_device() is None,
                    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("n, k", [(64, 96), (40, 30), (33, 2048)])  # whole, partial, odd rows
def test_the_unpacking_kernel_gives_the_centered_codes_exactly(n, k, monkeypatch):
    """``real_gemm.unpack_centered``, the packed bytes' one-launch unpacking
    (``UNPACK_PACKED``), gives the PyTorch ops' codes bit for bit, in int8 and in e4m3, and as
    fp8's custom operator (opcheck: its fake agrees with it); wrong bytes or dtypes are
    refused. On CUDA, fp8_weight_matrix takes it under the switch (the default)."""
    device = kernel_device()
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zero = torch.randint(0, 16, (n,), generator=g).to(torch.int32)
    packed = rg.pack_rows(codes)
    centered = rg.centered_codes(rg.unpack_rows(packed, k), zero)
    assert torch.equal(centered, codes - zero[:, None])
    want = rf.fp8_weight_matrix(packed, zero, k).float()
    assert torch.equal(want, centered.float())  # exact in e4m3
    on = packed.to(device), zero.to(device)
    got8 = rg.unpack_centered(*on, k)
    assert got8.dtype == torch.int8 and torch.equal(got8.cpu().to(torch.int32), centered)
    got = rf.unpack_e4m3(*on, k)
    assert got.dtype == rf.E4M3 and torch.equal(got.float().cpu(), want)
    torch.library.opcheck(torch.ops.qlip.unpack_e4m3, (*on, k),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="do not hold"):
        rg.unpack_centered(*on, k + 2)
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        rg.unpack_centered(*on, k, torch.int32)
    if device == "cuda":  # fp8_weight_matrix takes the launch under the switch, else PyTorch's ops
        for flag in (True, False):
            monkeypatch.setattr(rg, "UNPACK_PACKED", flag)
            assert torch.equal(rf.fp8_weight_matrix(*on, k).float().cpu(), want)


def test_activation_codes_stay_finite_at_the_range_ends():
    table = torch.tensor([[0.01, -128.0, 127.0]])
    lo, hi, s_a = rf.fp8_activation_scale(table, torch.tensor([0]), torch.tensor([0]), 0)
    x = torch.tensor([[-1e9, -1.28, -1.2799, 1.27, 1.2701, 1e9, 0.0, 3e-5]])
    a = rf.fp8_codes(x, lo, hi, s_a).float()
    assert torch.isfinite(a).all()
    assert a.abs().max() == rf.E4M3_MAX  # the range's far end lands on e4m3's largest value
    assert torch.equal(a[0, 0], a[0, 1]) and torch.equal(a[0, 4], a[0, 5])  # clipped


def test_a_w4a8_unet_runs_its_gemm_layers_in_fp8_and_stays_near_the_simulation(tiny_pipe):
    """use_real_execution(fp8=True) on a W4A8 model: the Linear layers and 1×1 convs whose
    every option is A8 take fp8 operands (exact weights), run on the CPU too, and each gives
    its fp8 product on the input it got; the UNet stays near the integer simulation (nearer
    than A8 is to FP). Packed (pack_weights), the same layers take fp8 from their own bytes and
    give the same outputs."""
    from qlip.methods.calib_data import CalibrationSet
    from qlip.methods.rtn import quantize_rtn
    from qlip.nn import QuantConfig, QuantConv2d, QuantLayer, pack_weights, use_real_execution
    from qlip.pipeline import prepare_unet

    from ..conftest import unet_inputs

    unet = tiny_pipe.unet
    fp_out = None
    x, t, c = unet_inputs(unet, 4, seed=1)
    with torch.no_grad():
        fp_out = unet(x, t, encoder_hidden_states=c).sample
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8))
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(4, dtype=torch.long)),
                 progress=False)
    with torch.no_grad():
        simulated = unet(x, t, encoder_hidden_states=c).sample
    assert use_real_execution(unet, fp8=True) > 0
    fp8_layers = [m for m in unet.modules() if isinstance(m, QuantLayer) and m._real_fp8]
    assert any(isinstance(m, QuantConv2d) for m in fp8_layers)  # the 1×1 convs as GEMMs
    assert sum(not isinstance(m, QuantConv2d) for m in fp8_layers) > 5
    assert all(m.real_kind() == "gemm" and m._real_parts[0][0].dtype == torch.float8_e4m3fn
               for m in fp8_layers)
    seen = {}
    for layer in fp8_layers:
        layer.register_forward_hook(lambda m, args, out: seen.__setitem__(m, (args[0], out)))
    with torch.no_grad():
        real = unet(x, t, encoder_hidden_states=c).sample
    assert set(seen) == set(fp8_layers)  # every fp8 layer ran its own product
    for layer, (inp, out) in seen.items():
        bank = layer.act_banks[0].stack
        args = (bank._flat_table(inp.dtype), layer._buffers["_choice"],
                layer._buffers["_step"], bank.num_steps or 0, *layer._real_parts[0],
                layer.bias)
        if isinstance(layer, QuantConv2d):
            want = rf.fp8_reference(inp.permute(0, 2, 3, 1), *args).permute(0, 3, 1, 2)
        else:
            want = rf.fp8_reference(inp, *args)
        assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, layer
    off = (real - simulated).abs().mean()
    moved = (simulated - fp_out).abs().mean()
    assert 0 < off < moved, (float(off), float(moved))
    # the switch back restores the simulation, bit for bit
    use_real_execution(unet, False)
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, simulated)
    # packed: the same fp8 layers read their own bytes (no e4m3 copy kept), the same outputs
    pack_weights(unet)
    assert use_real_execution(unet, fp8=True) > 0
    packed = [m for m in unet.modules() if isinstance(m, QuantLayer) and m._real_fp8]
    assert set(packed) == set(fp8_layers)
    assert all(m._real_parts[0][0].dtype == torch.uint8 for m in packed)
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, real)


def test_a_layer_with_a_float_option_beside_a8_keeps_the_integer_kernels(tiny_pipe):
    """fp8 covers A8 alone: with A16 beside it (the choice is data, read on the device) no
    layer takes fp8 operands, and every layer keeps real_gemm's integer operands."""
    from qlip.methods.calib_data import CalibrationSet
    from qlip.methods.rtn import quantize_rtn
    from qlip.nn import QuantConfig, QuantLayer, use_real_execution
    from qlip.pipeline import prepare_unet

    from ..conftest import unet_inputs

    unet = tiny_pipe.unet
    x, t, c = unet_inputs(unet, 2, seed=1)
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=(8, 16)))
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(2, dtype=torch.long)),
                 progress=False)
    assert use_real_execution(unet, fp8=True) > 0
    layers = [m for m in unet.modules() if isinstance(m, QuantLayer) and m._real is not None]
    assert layers and not any(m._real_fp8 for m in layers)
    assert all(m._real[2].dtype in (torch.int8, torch.uint8) for m in layers)


def test_a_loaded_w4a8_folder_runs_its_gemm_layers_in_fp8_alone_with_fp8(
        tiny_pipe, tmp_path, _tiny_pipeline_template):
    """load_for_sampling(real_fp8=True) without real kernels (`qlip eval --fp8`): the layers
    that can take fp8 run in fp8, on the CPU too, and every other layer stays simulated (no
    Triton, no int8 operands kept); switching back gives the simulation's outputs. With
    packed weights too, the same outputs from the packed bytes."""
    import copy

    from qlip.nn import QuantConfig, QuantLayer, use_fp8_execution
    from qlip.pipeline import CalibrationConfig, QuantizeJob, load_for_sampling, quantize_pipeline

    small = CalibrationConfig(num_prompts=2, num_inference_steps=3, num_kept_steps=2,
                              guidance=3.0)
    job = QuantizeJob(quant=QuantConfig(wbits=4, abits=8), calibration=small)
    quantize_pipeline(tiny_pipe, ["a red circle", "two squares"], job, tmp_path / "w4a8",
                      progress=False)
    pipe = copy.deepcopy(_tiny_pipeline_template)
    load_for_sampling(pipe, tmp_path / "w4a8", real_fp8=True)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantLayer)]
    fp8 = [m for m in layers if m._real_fp8]
    assert fp8 and all(m.real_kind() == "gemm" for m in fp8)
    assert all(m._real_parts is None for m in layers if not m._real_fp8)  # others simulated
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        real = pipe.unet(x, 10, encoder_hidden_states=c).sample
        assert use_fp8_execution(pipe.unet, False) == 0
        assert all(m._real_parts is None for m in layers)
        simulated = pipe.unet(x, 10, encoder_hidden_states=c).sample
        want = tiny_pipe.unet(x, 10, encoder_hidden_states=c).sample
    assert torch.equal(simulated, want)  # the loaded model is the calibrated one
    assert 0 < (real - simulated).abs().mean() < 0.1 * simulated.abs().mean()
    # --fp8 --packed-weights: the fp8 layers read their packed bytes, to the same outputs
    packed = copy.deepcopy(_tiny_pipeline_template)
    load_for_sampling(packed, tmp_path / "w4a8", packed_weights=True, real_fp8=True)
    layers = [m for m in packed.unet.modules() if isinstance(m, QuantLayer) and m._real_fp8]
    assert len(layers) == len(fp8) and all(m.packed for m in layers)
    with torch.no_grad():
        assert torch.equal(packed.unet(x, 10, encoder_hidden_states=c).sample, real)
