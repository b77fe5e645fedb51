import pytest
import torch
from torch import nn

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import (
    LayerRule,
    QuantAttnProcessor,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    quant_units,
    quantize_model,
)
from qlip.pipeline import decoder_input_splits, prepare_unet

from ..conftest import snr_db, unet_inputs


def random_calibration(unet, rows: int = 8, seed: int = 1) -> CalibrationSet:
    x, t, c = unet_inputs(unet, rows, seed)
    return CalibrationSet(x, t.float(), c, torch.zeros(rows, dtype=torch.long))


def quantized_copy(pipe, **config):
    unet = pipe.unet
    units = prepare_unet(unet, QuantConfig(**config))
    quantize_rtn(unet, units, random_calibration(unet), progress=False)
    return unet, units


@pytest.fixture
def fp_output(tiny_pipe):
    x, t, c = unet_inputs(tiny_pipe.unet, 4, seed=7)
    with torch.no_grad():
        return (x, t, c), tiny_pipe.unet(x, t, encoder_hidden_states=c).sample


def _run(unet, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def test_unet_sqnr_rises_with_bits(tiny_pipe, fp_output):
    inputs, ref = fp_output
    unet, units = quantized_copy(tiny_pipe, wbits=8, abits=8, abits_options=(8, 16))
    w8a8 = snr_db(ref, _run(unet, inputs))
    for unit in units.values():
        unit.set_bits(16)
    w8a16 = snr_db(ref, _run(unet, inputs))
    for unit in units.values():
        unit.set_bits(8)
        if isinstance(unit, QuantLinear | QuantConv2d):  # weights again at 4 bits, same FP weights
            unit.wbits = 4
            for q in unit.weight_quantizers:
                q.bits = 4
            unit.calibrate_weight("minmax")
    w4a8 = snr_db(ref, _run(unet, inputs))
    assert w8a8 >= 25.0
    assert w4a8 < w8a8 < w8a16


def test_swap_covers_layers_and_attention_with_presets(tiny_pipe):
    n_layers = sum(type(m) in (nn.Linear, nn.Conv2d) for m in tiny_pipe.unet.modules())
    units = prepare_unet(tiny_pipe.unet, QuantConfig(preset="dgq"))
    layers = [n for n, u in units.items() if isinstance(u, QuantLinear | QuantConv2d)]
    attns = [n for n, u in units.items() if isinstance(u, QuantAttnProcessor)]
    assert len(layers) == n_layers - 2  # conv_in and conv_out stay FP under DGQ's policy
    assert "conv_in" not in units and "conv_out" not in units
    assert len(attns) == 2 * 4  # attn1 + attn2 in 4 transformer blocks (1 down, 1 mid, 2 up)


def test_rules_precedence_first_match_wins():
    config = QuantConfig(
        wbits=4, preset="ptqd",
        rules=(LayerRule("conv_in", wbits=6), LayerRule("*", abits=16)),
    )
    assert config.rule_for("conv_in").wbits == 6  # the user's rule before the preset's
    assert config.rule_for("conv_out").abits == 16  # "*" matches before the preset's conv_out rule
    assert QuantConfig(preset="ptqd").rule_for("conv_out").wbits == 8
    assert QuantConfig(preset="ptqd").rule_for("down_blocks.0.resnets.0.conv1") is None


def test_fixed_abits_rule_makes_layer_static(tiny_pipe):
    units = prepare_unet(tiny_pipe.unet, QuantConfig(rules=(LayerRule("time_embedding.*", abits=16),)))
    assert units["time_embedding.linear_1"].dynamic is False
    assert units["time_embedding.linear_1"].default_bits == 16
    assert units["conv_in"].dynamic is True


def test_switching_one_layers_bits_changes_only_that_layer(tiny_pipe, fp_output):
    inputs, _ = fp_output
    unet, units = quantized_copy(tiny_pipe, wbits=8, abits=8, abits_options=(4, 8))
    order, outputs = [], {}

    def record(name):
        def hook(module, args, out):
            if name not in outputs:
                order.append(name)
            outputs[name] = out.detach().clone()
        return hook

    layers = {n: u for n, u in units.items() if isinstance(u, QuantLinear | QuantConv2d)}
    handles = [u.register_forward_hook(record(n)) for n, u in layers.items()]
    _run(unet, inputs)
    before = dict(outputs)
    target = "mid_block.resnets.0.conv1"
    layers[target].set_bits(4)
    _run(unet, inputs)
    for h in handles:
        h.remove()
    position = order.index(target)
    for name in order[:position]:
        assert torch.equal(outputs[name], before[name]), name
    assert not torch.equal(outputs[target], before[target])
    # the switched layer's own output is what a 4-bit input gives: recompute it directly
    assert snr_db(before[target], outputs[target]) < snr_db(before[target], before[target] + 1e-9)


def test_shortcut_splitting_gives_each_half_its_own_range(tiny_pipe):
    splits = decoder_input_splits(tiny_pipe.unet)
    assert splits["up_blocks.0.resnets.0.conv1"] == (64, 64)
    assert splits["up_blocks.1.resnets.0.conv_shortcut"] == (64, 32)
    layer = nn.Conv2d(8, 4, 1)
    units = quantize_model(nn.Sequential(layer), QuantConfig(wbits=8, abits=8), {"0": (4, 4)})
    split = units["0"]
    x = torch.cat([torch.randn(2, 4, 5, 5) * 0.01, torch.randn(2, 4, 5, 5) * 100], dim=1)
    split.calibrate_weight()
    for bank in split.act_banks:
        bank.observer = None
    from qlip.methods.calibrate import calibrate_bank, observing

    with observing(units) as observers:
        split(x)
    for name, bank in zip(sorted(observers), split.act_banks):
        calibrate_bank(bank, observers[name])
    scales = [float(bank.slot(8).scale) for bank in split.act_banks]
    assert scales[1] / scales[0] > 1000
    small_half = split.quantize_input(x)[:, :4]
    assert float((small_half - x[:, :4]).abs().max()) < 1e-3  # small half not crushed


def test_attention_processor_at_32_bits_matches_diffusers(tiny_pipe, fp_output):
    inputs, ref = fp_output
    unet = tiny_pipe.unet
    units = prepare_unet(unet, QuantConfig(wbits=32, abits=32, softmax_bits=32))
    assert any(isinstance(u, QuantAttnProcessor) for u in units.values())
    out = _run(unet, inputs)  # every quantizer bypassed: only the attention math remains
    assert torch.allclose(out, ref, atol=1e-5)


def test_log2_probs_with_start_token_kept(tiny_pipe, fp_output):
    inputs, ref = fp_output
    unet, units = quantized_copy(
        tiny_pipe, wbits=32, abits=32, softmax_bits=4, softmax_quantizer="log2",
        keep_start_token=True,
    )
    probs = {}
    processor = units["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    original = processor.prob_bank.forward
    processor.prob_bank.forward = lambda p, *args: probs.setdefault("in", p) is not None and (
        probs.setdefault("out", original(p, *args)))
    _run(unet, inputs)
    p_in, p_out = probs["in"], probs["out"]
    assert p_in.shape[-1] == 16 - 1  # the start token's column never reaches the quantizer
    ratios = p_out / p_out.amax()
    assert torch.allclose(torch.log2(ratios), torch.log2(ratios).round(), atol=1e-4)
    assert snr_db(ref, _run(unet, inputs)) > 10


def test_weights_are_quantized_once_and_cached(tiny_pipe, fp_output, monkeypatch):
    inputs, _ = fp_output
    unet, units = quantized_copy(tiny_pipe, wbits=4, abits=8)
    calls = []
    layer = units["conv_in"]
    original = layer.compute_quantized_weight
    monkeypatch.setattr(layer, "compute_quantized_weight", lambda: calls.append(1) or original())
    _run(unet, inputs)
    _run(unet, inputs)
    assert len(calls) <= 1
    assert len(torch.unique(layer.quantized_weight()[0])) <= 16  # a 4-bit grid per channel


def test_quantizing_twice_is_refused(tiny_pipe):
    prepare_unet(tiny_pipe.unet, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        prepare_unet(tiny_pipe.unet, QuantConfig())
    assert quant_units(tiny_pipe.unet)
