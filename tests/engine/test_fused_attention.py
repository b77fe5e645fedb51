"""The fused quantized attention (qlip.quant.fused_attention): the UNet gives the materialised
path's outputs with it on; the kernel equals the materialised reference (run where Triton can:
on CUDA, or on the CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.methods.runner import full_precision
from qlip.nn import QuantConfig, use_fused_attention
from qlip.pipeline import prepare_unet
from qlip.quant import fused_attention as fa

from ..conftest import kernel_device, unet_inputs


def _quantized(pipe, **config):
    unet = pipe.unet
    units = prepare_unet(unet, QuantConfig(wbits=8, **config))
    x, t, c = unet_inputs(unet, 8, seed=1)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(8, dtype=torch.long)),
                 progress=False)
    return unet, units


def _both(unet, inputs):
    """(materialised, fused) outputs of the same call."""
    x, t, c = inputs
    outs = []
    for on in (False, True):
        assert use_fused_attention(unet, on) > 0
        with torch.no_grad():
            outs.append(unet(x, t, encoder_hidden_states=c).sample)
    use_fused_attention(unet, False)
    return outs


def _spy_fused(monkeypatch):
    calls = []
    original = fa.fused_attention
    monkeypatch.setattr(fa, "fused_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("bits", [8, torch.tensor([4, 8, 32])], ids=["batch", "per_image"])
def test_uniform_probabilities_fused_equal_materialised(tiny_pipe, bits, monkeypatch):
    unet, units = _quantized(tiny_pipe, abits=8, abits_options=(4, 8, 32), softmax_bits=8)
    for unit in units.values():
        unit.set_bits(bits)
    x, t, c = unet_inputs(unet, 3, seed=2)
    calls = _spy_fused(monkeypatch)
    plain, fused = _both(unet, (torch.cat([x, x]), torch.cat([t, t]), torch.cat([c * 0, c])))
    assert calls  # the fused path ran
    assert torch.allclose(plain, fused, atol=1e-5, rtol=1e-4)


def test_log2_with_start_token_per_image_fused_equal_materialised(tiny_pipe, monkeypatch):
    # DGQ's attention: log2 probabilities at the unit's bits, the first key kept, Δ per image
    unet, units = _quantized(tiny_pipe, abits=8, abits_options=(4, 8), softmax_quantizer="log2",
                             keep_start_token=True, softmax_follows_abits=True)
    for unit in units.values():
        unit.set_bits(torch.tensor([4, 8]))
    x, t, c = unet_inputs(unet, 2, seed=3)
    calls = _spy_fused(monkeypatch)
    plain, fused = _both(unet, (torch.cat([x, x]), torch.cat([t, t]), torch.cat([c * 0, c])))
    assert calls
    assert torch.allclose(plain, fused, atol=1e-5, rtol=1e-4)


def test_full_precision_pass_and_training_take_their_own_paths(tiny_pipe, monkeypatch):
    unet, units = _quantized(tiny_pipe, abits=8, softmax_bits=8)
    inputs = unet_inputs(unet, 2, seed=4)
    with full_precision(units):
        plain, fused = _both(unet, inputs)  # every row bypassed in the kernel's parameters
    assert torch.allclose(plain, fused, atol=1e-5, rtol=1e-4)
    calls = _spy_fused(monkeypatch)
    use_fused_attention(unet, True)
    x, t, c = inputs
    unet(x, t, encoder_hidden_states=c.requires_grad_(True)).sample.sum().backward()
    assert not calls and c.grad is not None  # gradients need the materialised probabilities


def test_by_default_a_unit_fuses_where_the_kernel_runs(tiny_pipe, monkeypatch):
    """A unit starts at ``fused = None``: the fused path where the Triton kernel can run (on a
    CUDA tensor), the materialised probabilities elsewhere; True and False force either."""
    unet, units = _quantized(tiny_pipe, abits=8, softmax_bits=8)
    assert all(unit.fused is None for unit in units.values() if unit.kind == "attention")
    x, t, c = unet_inputs(unet, 2, seed=5)
    calls = _spy_fused(monkeypatch)

    def run():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=c).sample

    monkeypatch.setattr(fa, "available", lambda q: False)  # (the CPU without the interpreter)
    plain = run()
    assert not calls
    monkeypatch.setattr(fa, "available", lambda q: True)  # a kernel device: fused, here
    spy = fa.fused_attention  # through the kernel's two passes in PyTorch
    monkeypatch.setattr(fa, "fused_attention",
                        lambda *a, **k: spy(*a, **{**k, "use_kernel": False}))
    assert torch.allclose(run(), plain, atol=1e-5, rtol=1e-4)
    assert calls
    calls.clear()
    use_fused_attention(unet, False)
    run()
    assert not calls


def test_probability_quantizers_match_a_hand_computation():
    p = torch.tensor([[[0.5, 0.26, 0.125, 0.115, 0.0]]])
    # uniform: Δ = 1/4, codes 0..3 (low 0, high 3)
    out = fa.quantize_probs(p, torch.tensor([[0.25, 0.0, 3.0, 0.0]]), fa.UNIFORM)
    assert torch.equal(out, torch.tensor([[[0.5, 0.25, 0.0, 0.0, 0.0]]]))  # 0.125/0.25 = 0.5 -> 0
    # log2: Δ = 0.5, 2 bits (codes 0..3): 0.5 -> 0, 0.26 -> 1 (0.25), 0.125 -> 2, 0.115 -> 2,
    # 0 -> the last code (Δ·2^-3)
    out = fa.quantize_probs(p, torch.tensor([[0.5, 3.0, 0.0, 0.0]]), fa.LOG2)
    assert torch.equal(out, torch.tensor([[[0.5, 0.25, 0.125, 0.125, 0.0625]]]))
    # bypass leaves the row alone
    assert torch.equal(fa.quantize_probs(p, torch.tensor([[0.5, 3.0, 0.0, 1.0]]), fa.LOG2), p)


@pytest.mark.skipif(kernel_device() is None,
                    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("mode", [fa.UNIFORM, fa.LOG2], ids=["uniform", "log2"])
@pytest.mark.parametrize("keep_first", [False, True])
# keys within the first block; whole blocks after it; whole blocks and a partial last one (the
# kernels peel the first block, run full blocks unmasked and mask a partial last one)
@pytest.mark.parametrize("m", [21, 128, 150])
def test_kernel_equals_the_materialised_reference(mode, keep_first, m):
    device = kernel_device()
    g = torch.Generator().manual_seed(0)
    rows, n, d = 6, 37, 40  # queries not a multiple of the blocks; SD 1.x's head dim 40
    q, k, v = (torch.randn(rows, s, d, generator=g).to(device) for s in (n, m, m))
    scale = d ** -0.5
    stats = fa.kernel_row_stats(q, k, scale)
    for got, want in zip(stats, fa.row_stats(q, k, scale)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    row_max = fa.row_max_prob(*stats, keep_first).cpu()
    if mode == fa.UNIFORM:  # 8 bits over [0, max], row 5 bypassed
        params = torch.stack([row_max / 255, torch.zeros(rows), torch.full((rows,), 255.0),
                              torch.zeros(rows)], dim=1)
    else:  # 4-bit log2, Δ the row's max
        params = torch.stack([row_max, torch.full((rows,), 15.0), torch.zeros(rows),
                              torch.zeros(rows)], dim=1)
    params[5, 3] = 1.0
    params = params.to(device)
    got = fa.kernel_output(q, k, v, stats[0], stats[1], params, scale, mode, keep_first)
    want = fa.reference_attention(q, k, v, scale, params, mode, keep_first)
    diff = (got - want).abs()
    # equal within fp32 rounding, except where a probability sits on a rounding boundary and
    # the two computations round it to neighbouring codes: one step of the grid times |v|
    assert (diff <= 1e-5).float().mean() >= 0.999
    step = float(params[:, 0].max()) if mode == fa.UNIFORM else float(row_max.max()) / 2
    assert float(diff.max()) <= step * float(v.abs().max()) + 1e-5
    # the bypassed row is plain attention
    plain = torch.softmax(q[5:] @ k[5:].transpose(1, 2) * scale, dim=-1) @ v[5:]
    assert torch.allclose(got[5:], plain, atol=1e-5)


@pytest.mark.skipif(kernel_device() != "cuda", reason="16-bit products need a CUDA GPU (the "
                    "interpreter truncates bf16 casts)")
@pytest.mark.parametrize("keep_first", [False, True])
def test_bf16_kernel_equals_the_reference_with_16_bit_probabilities(keep_first):
    # bf16 inputs take tensor-core products (exact in fp32) and round the quantized
    # probabilities to bf16 before the product with v, as the bf16 materialised path does
    g = torch.Generator().manual_seed(1)
    rows, n, m, d = 4, 300, 77, 40
    q, k, v = (torch.randn(rows, s, d, generator=g).to("cuda", torch.bfloat16) for s in (n, m, m))
    scale = d ** -0.5
    stats = fa.kernel_row_stats(q, k, scale)
    row_max = fa.row_max_prob(*stats, keep_first)
    params = torch.stack([row_max / 255, torch.zeros_like(row_max),
                          torch.full_like(row_max, 255.0), torch.zeros_like(row_max)], dim=1)
    got = fa.kernel_output(q, k, v, stats[0], stats[1], params, scale, fa.UNIFORM,
                           keep_first).float()
    probs = torch.softmax(fa._scores(q, k, scale), dim=-1)
    quantized = fa.quantize_probs(probs, params, fa.UNIFORM)
    if keep_first:
        quantized = torch.cat([probs[:, :, :1], quantized[:, :, 1:]], dim=2)
    want = torch.bmm(quantized.to(torch.bfloat16).float(), v.float())
    diff = (got - want).abs()
    # bf16 output rounding (2^-8 relative), except at rounding boundaries of the 8-bit grid
    assert (diff <= 2 ** -8 * want.abs() + 1e-4).float().mean() >= 0.995
    assert float(diff.max()) <= float(params[:, 0].max()) * float(v.float().abs().max()) + 1e-2


@pytest.mark.skipif(kernel_device() is None,
                    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("keep_first", [False, True])
def test_a_compiled_graph_keeps_both_passes_as_operators(keep_first):
    """Under torch.compile the two passes are the custom operators (Inductor keeps them opaque;
    tracing the autotuned kernels themselves failed to compile on an H100), the quantizer's
    parameters between them are graph ops, and the output is the eager kernels' bit for bit."""
    device = kernel_device()
    g = torch.Generator().manual_seed(2)
    rows, n, m, d = 4, 37, 21, 40
    q, k, v = (torch.randn(rows, s, d, generator=g).to(device) for s in (n, m, m))

    def params_for(row_max):  # 8 bits over [0, the row's max]
        zeros = torch.zeros_like(row_max)
        return torch.stack([row_max / 255, zeros, zeros + 255.0, zeros], dim=1)

    def attend(q, k, v):
        return fa.fused_attention(q, k, v, d ** -0.5, params_for, fa.UNIFORM, keep_first,
                                  use_kernel=True)

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = attend(q, k, v)
    torch._dynamo.reset()
    got = torch.compile(attend, backend=recording, fullgraph=True)(q, k, v)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("qlip.attention_row_stats" in t for t in targets) == 1
    assert sum("qlip.attention_output" in t for t in targets) == 1
    assert torch.equal(got, eager)
