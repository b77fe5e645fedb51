"""Generation with bit policies, max over the batch, calibration from a real pipeline run, save/load."""

import numpy as np
import pytest
import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.nn import QuantConfig, QuantLayer
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    capture_unet_inputs,
    generate,
    load_quantized,
    quantize_pipeline,
)
from qlip.pipeline import quantize as quantize_module
from qlip.policies import BitPolicy, FixedBits

PROMPTS = ["a red circle", "two blue squares", "a star", "green"]
SMALL = CalibrationConfig(num_prompts=2, num_inference_steps=4, num_kept_steps=2, guidance=3.0)
GEN = GenerationConfig(steps=3, guidance=3.0, batch_size=2)


class LengthPolicy(BitPolicy):
    """Test policy: 16 bits for prompts longer than 8 characters, 8 otherwise."""

    def __init__(self):
        self.calls = 0

    def possible_bits(self):
        return {8, 16}

    def begin(self, batch, num_steps):
        self.wants = torch.tensor([16 if len(p) > 8 else 8 for p in batch.prompts])
        assert batch.pooled.shape[0] == len(batch.prompts)

    def bits(self, step, timestep):
        self.calls += 1
        return self.wants[:, None].expand(-1, len(self.unit_names))


def _quantize(pipe, tmp_path, **config):
    job = QuantizeJob(quant=QuantConfig(**config), calibration=SMALL)
    return quantize_pipeline(pipe, PROMPTS, job, tmp_path / "q", progress=False)


def test_capture_records_both_guidance_halves_at_kept_steps(tiny_pipe):
    data = capture_unet_inputs(tiny_pipe, PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0,
                               keep_steps=[0, 3], progress=False)
    assert len(data) == 2 * 2 * 2  # prompts × halves × kept steps
    assert sorted(set(data.steps.tolist())) == [0, 3]
    first = data.subset(torch.nonzero(data.steps == 0).flatten())
    assert len(set(first.timesteps.tolist())) == 1
    # the unconditional half: identical (empty-prompt) embeddings for both prompts
    assert torch.equal(first.text[0], first.text[1])
    assert not torch.equal(first.text[2], first.text[3])


def test_rtn_from_a_pipeline_run_calibrates_everything_and_removes_observers(tiny_pipe, tmp_path):
    units = _quantize(tiny_pipe, tmp_path, wbits=8, abits=8, abits_options=(8, 16))
    for unit in units.values():
        for bank in unit.activation_banks().values():
            assert bank.observer is None
        unit.check_calibrated()  # every bit-width of every bank
        if isinstance(unit, QuantLayer):
            assert unit.weight_codes() is not None
    assert (tmp_path / "q" / "calibration.safetensors").is_file()


def test_second_calibration_reuses_the_cache(tiny_pipe, tmp_path, monkeypatch, _tiny_pipeline_template):
    _quantize(tiny_pipe, tmp_path)
    cached = CalibrationSet.load(tmp_path / "q" / "calibration.safetensors")
    monkeypatch.setattr(quantize_module, "capture_unet_inputs",
                        lambda *a, **k: pytest.fail("resampled despite the cache"))
    import copy

    again = copy.deepcopy(_tiny_pipeline_template)
    data = quantize_module.calibration_data(again, PROMPTS, SMALL,
                                            tmp_path / "q" / "calibration.safetensors")
    assert torch.equal(data.latents, cached.latents)


def test_each_layer_runs_at_the_max_over_the_batch(tiny_pipe, tmp_path):
    _quantize(tiny_pipe, tmp_path, wbits=8, abits=8, abits_options=(8, 16))
    policy = LengthPolicy()
    mixed = generate(tiny_pipe, ["red", "a long prompt"], [0, 1], policy, GEN, progress=False)
    assert [r.fab_requested for r in mixed.reports] == [8.0, 16.0]
    assert [r.fab for r in mixed.reports] == [16.0, 16.0]
    assert policy.calls == GEN.steps
    alone = generate(tiny_pipe, ["red"], [0], policy, GEN, progress=False)
    assert alone.reports[0].fab == 8.0
    assert alone.reports[0].bitops_t < mixed.reports[0].bitops_t
    # same seed, higher bits in the batch: a different image from running alone at 8 bits
    assert not np.array_equal(np.asarray(mixed.images[0]), np.asarray(alone.images[0]))


def test_policy_asking_for_uncalibrated_bits_is_refused(tiny_pipe, tmp_path):
    _quantize(tiny_pipe, tmp_path, wbits=8, abits=8)
    with pytest.raises(ValueError, match="abits 16 was not calibrated|needs activation bits"):
        generate(tiny_pipe, ["red"], [0], FixedBits(16), GEN, progress=False)


def test_save_load_is_bit_identical(tiny_pipe, tmp_path, _tiny_pipeline_template):
    import copy

    _quantize(tiny_pipe, tmp_path, wbits=4, abits=8, abits_options=(8, 16))
    before = generate(tiny_pipe, ["a red circle"], [3], FixedBits(8), GEN, progress=False)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    info = load_quantized(fresh.unet, tmp_path / "q")
    assert info.method == "rtn" and info.config.abits_options == (8, 16)
    after = generate(fresh, ["a red circle"], [3], FixedBits(8), GEN, progress=False)
    assert np.array_equal(np.asarray(before.images[0]), np.asarray(after.images[0]))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        a = tiny_pipe.unet(x, 10, encoder_hidden_states=c).sample
        b = fresh.unet(x, 10, encoder_hidden_states=c).sample
    assert torch.equal(a, b)


def test_loaded_state_lands_on_the_model_device(tiny_pipe, tmp_path, _tiny_pipeline_template):
    # A quantizer slot that is empty before loading (its scale is None) must take the model's
    # device, not the file's (CPU): the "meta" device stands in for a GPU here.
    import copy

    _quantize(tiny_pipe, tmp_path, wbits=4, abits=8)
    fresh = copy.deepcopy(_tiny_pipeline_template).unet.to("meta")
    load_quantized(fresh, tmp_path / "q", strict_base=False)
    devices = {t.device.type for t in fresh.buffers()} | {p.device.type for p in fresh.parameters()}
    assert devices == {"meta"}


def test_loading_onto_another_base_model_is_refused(tiny_pipe, tmp_path, _tiny_pipeline_template):
    import copy

    _quantize(tiny_pipe, tmp_path)
    other = copy.deepcopy(_tiny_pipeline_template)
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1.0)
    with pytest.raises(ValueError, match="different base model"):
        load_quantized(other.unet, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="not a qlip quantized model"):
        load_quantized(other.unet, tmp_path / "missing")


def test_per_step_tables_are_calibrated_and_used_by_step_index(tiny_pipe, tmp_path):
    steps = 3
    job = QuantizeJob(
        quant=QuantConfig(wbits=8, abits=8, act_steps=steps),
        calibration=CalibrationConfig(num_prompts=2, num_inference_steps=steps,
                                      num_kept_steps=steps, guidance=3.0),
    )
    units = quantize_pipeline(tiny_pipe, PROMPTS, job, tmp_path / "q", progress=False)
    scale = units["conv_in"].act_banks[0].slot(8).scale  # [steps, 1]
    assert scale.shape == (steps, 1)
    assert len(torch.unique(scale)) == steps  # x_t's range differs from step to step
    seen = []
    bank = units["conv_in"].act_banks[0]
    original = bank.forward
    bank.forward = lambda x, choice, heads, step: seen.append(int(step)) or original(
        x, choice, heads, step)
    generate(tiny_pipe, ["red"], [0], None, GenerationConfig(steps=steps, guidance=3.0),
             progress=False)
    del bank.forward
    assert seen == list(range(steps))
    with pytest.raises(ValueError, match="per-step table of 3 steps"):
        generate(tiny_pipe, ["red"], [0], None, GenerationConfig(steps=4, guidance=3.0),
                 progress=False)


def test_a_compiled_unet_samples_the_eager_images_and_compiles_once(tiny_pipe, tmp_path,
                                                                    monkeypatch):
    """GenerationConfig.compile: the UNet's calls go through torch.compile's graph, but the one
    whose MACs are counted (eager, the first of a new shape's first run); bits changing per
    prompt, per run and per policy recompile nothing; the images, cost reports and bits are
    eager sampling's (under a backend that runs the traced graph as traced); the UNet's own
    forward comes back after the run."""
    from dataclasses import replace

    from qlip.pipeline import compiled
    from qlip.pipeline.session import unet_calls

    _quantize(tiny_pipe, tmp_path, wbits=8, abits=8, abits_options=(8, 16))
    graphs, calls = [], []

    def backend(gm, example_inputs):  # counts compilations and calls of the compiled graphs
        graphs.append(gm)

        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run

    monkeypatch.setattr(compiled, "BACKEND", backend)
    torch._dynamo.reset()
    prompts, seeds = ["red", "a long prompt"], [0, 1]
    eager = generate(tiny_pipe, prompts, seeds, LengthPolicy(), GEN, progress=False)
    config = replace(GEN, compile="default")
    got = generate(tiny_pipe, prompts, seeds, LengthPolicy(), config, progress=False)
    # one graph, no break; every call ran it (the MACs of these shapes were counted by the
    # eager run before, on its first call, and are kept on the UNet)
    assert len(graphs) == 1
    assert len(calls) == unet_calls(tiny_pipe, GEN.steps)
    assert "forward" not in tiny_pipe.unet.__dict__  # its own forward is back
    for a, b in zip(got.images, eager.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert [r.to_dict() for r in got.reports] == [r.to_dict() for r in eager.reports]
    assert np.array_equal(got.bits, eager.bits)
    # a new run (a new step controller, its own step and choice tensors) at other bits and
    # batch size 2 again: the same graph, no recompile (the bits are data)
    fixed = generate(tiny_pipe, prompts, seeds, FixedBits(16), config, progress=False)
    assert len(graphs) == 1 and all(r.fab == 16.0 for r in fixed.reports)
    again = generate(tiny_pipe, ["red"], [0], FixedBits(16), config, progress=False)
    alone = generate(tiny_pipe, ["red"], [0], FixedBits(16), GEN, progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(alone.images[0]))
    # another batch size is another shape, which may compile once; other bits then do not
    before = len(graphs)
    assert before <= 2
    generate(tiny_pipe, ["red"], [0], LengthPolicy(), config, progress=False)
    assert len(graphs) == before
    # another resolution: its MACs counted once, on an eager first call
    calls.clear()
    taller = replace(config, height=64, width=48)  # latents 32 × 24
    first = generate(tiny_pipe, ["red"], [0], FixedBits(8), taller, progress=False)
    assert len(calls) == unet_calls(tiny_pipe, GEN.steps) - 1
    calls.clear()
    second = generate(tiny_pipe, ["red"], [0], FixedBits(8), taller, progress=False)
    assert len(calls) == unet_calls(tiny_pipe, GEN.steps)
    assert second.reports[0].bitops_t == first.reports[0].bitops_t > again.reports[0].bitops_t
    # a deep copy of the pipeline, its weights changed, samples with its own weights compiled
    import copy

    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        other.unet.conv_out.bias.add_(0.5)
    want = generate(other, ["red"], [0], FixedBits(8), GEN, progress=False)
    copied = generate(other, ["red"], [0], FixedBits(8), config, progress=False)
    assert np.array_equal(np.asarray(copied.images[0]), np.asarray(want.images[0]))
    assert not np.array_equal(np.asarray(want.images[0]), np.asarray(again.images[0]))
    with pytest.raises(ValueError, match="compile mode must be one of"):
        GenerationConfig(compile="fastest")


def test_the_execution_label_records_the_compile_mode_and_fused_attention(monkeypatch):
    from argparse import Namespace

    from qlip.cli_args import execution_label
    from qlip.pipeline import quantized_model

    def label(attention="auto", device="cpu", **flags):
        return execution_label(Namespace(**{"real_kernels": False, "fp8": False, "compile": None,
                                            "attention": attention, "device": device, **flags}))

    assert label(real_kernels=True, fp8=True, compile="reduce-overhead") == \
        "real kernels, fp8 A8 GEMMs, compiled (reduce-overhead)"
    assert label() == "simulated"  # auto: no Triton kernel on the CPU
    assert label("fused") == "simulated, fused attention"  # the PyTorch passes
    monkeypatch.setattr(quantized_model.fused_quantize, "triton", object())  # as with Triton
    monkeypatch.setattr("qlip.cli_args.device_name", lambda name: name)  # (no GPU here)
    assert label(device="cuda") == "simulated, fused attention"
    assert label("materialised", "cuda") == "simulated"
    assert label(device="cpu") == "simulated"
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # no quantized attention unit: no label
    assert execution_label(Namespace(real_kernels=False, fp8=False, compile=None,
                                     attention="fused", device="cpu"), plain) == "simulated"
    with pytest.raises(ValueError, match="attention must be one of"):
        label("flash")
