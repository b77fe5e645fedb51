"""Q-Diffusion on a tiny random pipeline: block reconstruction, the calibrated activation bank,
and resuming an interrupted reconstruction."""

import copy

import pytest
import torch

from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.qdiffusion import QDiffusionConfig, quantize_qdiffusion
from qlip.methods.runner import activations_bypassed, capture_unit, full_precision, sample_rows
from qlip.nn import QuantConfig, QuantLayer
from qlip.pipeline import capture_unet_inputs, prepare_unet

from ..conftest import snr_db, unet_inputs

CONFIG = QDiffusionConfig(
    reconstruction=ReconstructionConfig(iters=30, lr=1e-2, batch_size=4, num_samples=16),
    act_init_samples=4, act_init_values=4096,
)
QUANT = QuantConfig(wbits=4, abits=8, abits_options=(6, 8, 16))
BLOCK = "mid_block.resnets.0"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def calibration(_tiny_pipeline_template):
    return capture_unet_inputs(_tiny_pipeline_template, ["a red circle", "two blue squares"],
                               num_inference_steps=4, guidance_scale=3.0, keep_steps=[0, 3],
                               progress=False)


def _quantized(template, data, out_dir, on_unit_done=None):
    unet = copy.deepcopy(template.unet)
    units = prepare_unet(unet, QUANT)
    quantize_qdiffusion(unet, units, data, CONFIG, out_dir, progress=False,
                        on_unit_done=on_unit_done)
    return unet, units


@pytest.fixture(scope="module")
def qdiffusion(_tiny_pipeline_template, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdiffusion")
    unet, units = _quantized(_tiny_pipeline_template, calibration, out)
    return unet, units, out


def _codes(units):
    return {n: [c.clone() for c in u.weight_codes()] for n, u in units.items()
            if isinstance(u, QuantLayer)}


def test_block_reconstruction_lowers_the_block_output_error(qdiffusion, calibration):
    unet, units, _ = qdiffusion
    block = unet.get_submodule(BLOCK)
    rows = sample_rows(len(calibration), 8, 1)
    recon = CONFIG.reconstruction
    with activations_bypassed(units):
        inputs = capture_unit(unet, units, block, calibration, rows, recon, want_output=False)
        with full_precision(units):
            target = capture_unit(unet, units, block, calibration, rows, recon, True)
        args, kwargs = inputs.take(torch.arange(inputs.size))
        with torch.no_grad():
            reconstructed = block(*args, **kwargs)
            layers = {n: u for n, u in units.items() if n.startswith(BLOCK + ".")}
            saved = {n: u.weight_codes() for n, u in layers.items()}
            for layer in layers.values():
                layer.calibrate_weight("mse")  # round-to-nearest on the same grid
            nearest = block(*args, **kwargs)
            for name, layer in layers.items():
                layer.set_weight_codes(saved[name])
    assert any(not torch.equal(layer.weight_codes()[0], layer.weight_quantizers[0]
                               .quantize_codes(layer.weight)) for layer in layers.values())
    error_recon = ((reconstructed - target) ** 2).mean()
    error_nearest = ((nearest - target) ** 2).mean()
    assert error_recon < 0.9 * error_nearest, (error_recon, error_nearest)


def test_activation_bank_switches_bits_and_error_falls_with_bits(qdiffusion,
                                                                 _tiny_pipeline_template):
    unet, units, _ = qdiffusion
    x, t, c = unet_inputs(unet)
    with torch.no_grad():
        reference = _tiny_pipeline_template.unet(x, t, encoder_hidden_states=c).sample
        outputs = {}
        for bits in (6, 8, 16):
            for unit in units.values():
                if unit.dynamic:
                    unit.set_bits(bits)
            outputs[bits] = unet(x, t, encoder_hidden_states=c).sample
        for unit in units.values():
            unit.set_bits(unit.default_bits)
    assert not torch.equal(outputs[6], outputs[8]) and not torch.equal(outputs[8], outputs[16])
    snr = {bits: snr_db(reference, out) for bits, out in outputs.items()}
    assert snr[6] < snr[8] < snr[16], snr
    assert snr[16] > 10.0, snr  # W4 with 16-bit activations stays close to FP


def test_resume_after_interruption_is_bit_identical(qdiffusion, _tiny_pipeline_template,
                                                    calibration, tmp_path):
    _, units, _ = qdiffusion
    finished = []

    def stop_after_five(name):
        finished.append(name)
        if len(finished) == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        _quantized(_tiny_pipeline_template, calibration, tmp_path, stop_after_five)
    assert len(list((tmp_path / "reconstruction").glob("*.safetensors"))) == 5
    resumed = []
    _, resumed_units = _quantized(_tiny_pipeline_template, calibration, tmp_path, resumed.append)
    assert resumed[:5] == finished  # loaded from the checkpoints, then the rest trained
    expected, got = _codes(units), _codes(resumed_units)
    assert expected.keys() == got.keys()
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            assert torch.equal(a, b), name
    for (name, a), b in zip(units.items(), resumed_units.values()):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), f"{name}.{key}"


def test_step_size_tuning_lowers_the_error_at_low_bits(qdiffusion, calibration,
                                                       _tiny_pipeline_template):
    from dataclasses import replace

    from qlip.methods.qdiffusion import tune_activation_steps
    from qlip.nn import ActivationBank, quant_units

    unet = copy.deepcopy(qdiffusion[0])
    units = quant_units(unet)
    for unit in units.values():
        if unit.dynamic:
            unit.set_bits(6)
    x, t, c = calibration.latents, calibration.timesteps, calibration.text  # in distribution
    with torch.no_grad():
        reference = _tiny_pipeline_template.unet(x, t, encoder_hidden_states=c).sample
        before = snr_db(reference, unet(x, t, encoder_hidden_states=c).sample)
    scales = {n: b.slot(6).scale.clone() for n, b in unet.named_modules()
              if isinstance(b, ActivationBank) and 6 in b.options}
    tune_activation_steps(unet, units, calibration, replace(CONFIG, act_tune_iters=20),
                          progress=False)
    with torch.no_grad():
        after = snr_db(reference, unet(x, t, encoder_hidden_states=c).sample)
    changed = [n for n, b in unet.named_modules() if n in scales
               and not torch.equal(b.slot(6).scale, scales[n])]
    assert len(changed) > len(scales) // 2  # the 6-bit step sizes were tuned
    assert after > before, (before, after)


def test_running_min_max_passes_mix_sampling_steps(_tiny_pipeline_template, calibration):
    # The running min/max must not end on the last sampling step's batches: with mixed passes
    # some pass holds rows of several steps, and the passes do not come in step order.
    from qlip.methods.runner import run_rows

    unet = copy.deepcopy(_tiny_pipeline_template.unet)
    seen = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: seen.append(sorted(set(args[1].tolist()))))
    try:
        with torch.no_grad():
            run_rows(unet, {}, calibration, torch.arange(len(calibration)), 4, shuffle_seed=0,
                     mix_steps=True)
    finally:
        handle.remove()
    assert any(len(timesteps) > 1 for timesteps in seen), seen
    assert sum(len(t) for t in seen) > len(set(t for ts in seen for t in ts)), seen


def test_weights_from_reuses_codes_and_calibrates_activations_anew(
        qdiffusion, _tiny_pipeline_template, calibration, tmp_path):
    from qlip.pipeline.saving import QuantizedInfo, load_quantized_weights, save_quantized

    unet, units, _ = qdiffusion
    save_quantized(unet, QuantizedInfo(QUANT, "qdiffusion", {}, "tiny", {}), tmp_path / "w4")
    other = QuantConfig(wbits=4, abits=8)  # another activation bank, same weight settings
    fresh = copy.deepcopy(_tiny_pipeline_template.unet)
    fresh_units = prepare_unet(fresh, other)
    load_quantized_weights(fresh, fresh_units, other, tmp_path / "w4")
    quantize_qdiffusion(fresh, fresh_units, calibration, CONFIG, progress=False,
                        weights_ready=True)
    before, after = _codes(units), _codes(fresh_units)
    assert before.keys() == after.keys()
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], after[n]))
    x, t, c = unet_inputs(fresh)
    with torch.no_grad():
        reference = _tiny_pipeline_template.unet(x, t, encoder_hidden_states=c).sample
        assert snr_db(reference, fresh(x, t, encoder_hidden_states=c).sample) > 5.0
    eight, third = QuantConfig(wbits=8, abits=8), copy.deepcopy(_tiny_pipeline_template.unet)
    with pytest.raises(ValueError, match="other settings \\(wbits\\)"):
        load_quantized_weights(third, prepare_unet(third, eight), eight, tmp_path / "w4")
