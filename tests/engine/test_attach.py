"""The drop-in API: after ``qlip.attach_quantization`` a plain ``pipe(...)`` call runs the bit
policy and the per-step tables and leaves a cost report; ``generate`` is the same path; detach
gives the FP pipeline back bit for bit."""

import copy
import inspect

import numpy as np
import pytest
import torch

import qlip
from qlip.nn import QuantConfig, quant_units
from qlip.pipeline import CalibrationConfig, GenerationConfig, QuantizeJob, generate
from qlip.pipeline.prompts import encode_prompt_batch
from qlip.pipeline.session import SamplingSession
from qlip.policies import FixedBits
from qlip.testing import build_tiny_sdxl_pipeline

PROMPTS = ["a red circle", "two blue squares"]
STEPS, GUIDANCE = 3, 3.0


def _call(pipe, prompts=PROMPTS, **kwargs):
    count = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                output_type="np", **kwargs).images


def _job():
    return QuantizeJob(
        quant=QuantConfig(wbits=4, abits=8, abits_options=(4, 8), act_steps=STEPS),
        calibration=CalibrationConfig(num_prompts=2, num_inference_steps=STEPS,
                                      num_kept_steps=STEPS, guidance=GUIDANCE, batch_size=2))


@pytest.fixture(scope="module")
def attached(_tiny_pipeline_template):
    pipe = copy.deepcopy(_tiny_pipeline_template)
    fp = _call(pipe)
    scheduler = pipe.scheduler
    handle = qlip.attach_quantization(pipe, _job(), PROMPTS, progress=False)
    return pipe, handle, fp, scheduler


class _Recording(FixedBits):
    """Fixed bits that keep what ``begin`` was given."""

    reads_prompt = True

    def begin(self, batch, num_steps):
        self.batch, self.num_steps = batch, num_steps
        super().begin(batch, num_steps)


def test_a_plain_pipe_call_runs_the_policy_and_reports_its_cost(attached):
    pipe, handle, fp, _ = attached
    assert pipe.qlip is handle
    a8 = _call(pipe)
    record = handle.last
    assert [r.fab for r in record.reports] == [8.0, 8.0]
    assert all(r.steps == STEPS and r.unet_calls == STEPS and r.bitops_t > 0
               for r in record.reports)
    assert record.bits.shape == (2, STEPS, len(handle.units)) and (record.bits == 8).all()
    assert not np.array_equal(a8, fp)  # the quantized UNet ran
    handle.use(4)
    a4 = _call(pipe)
    handle.use(8)
    assert [r.fab for r in handle.last.reports] == [4.0, 4.0] and (handle.last.bits == 4).all()
    assert not np.array_equal(a4, a8)  # the policy's bits reached the units
    assert np.array_equal(_call(pipe), a8)
    # generate() is a user of the same session: the same images and reports
    result = generate(pipe, PROMPTS, [0, 1], FixedBits(8),
                      GenerationConfig(steps=STEPS, guidance=GUIDANCE), progress=False)
    assert np.array_equal(np.stack([np.asarray(i) for i in result.images]),
                          (a8 * 255).round().astype(np.uint8))
    assert [r.fab for r in result.reports] == [8.0, 8.0] and result.reports[1].seed == 1
    assert handle.policy.abits == 8  # generate's policy was for its call only


def test_per_step_tables_follow_the_steps_of_a_plain_call(attached):
    pipe, handle, _, _ = attached
    name, unit = next((n, u) for n, u in handle.units.items() if u.step_rows() == STEPS)
    seen = []
    hook = unit.register_forward_pre_hook(lambda m, a: seen.append(int(m.step_index())))
    try:
        _call(pipe)
    finally:
        hook.remove()
    per_call = len(seen) // STEPS  # a unit may run more than once per UNet call
    assert seen == [s for s in range(STEPS) for _ in range(per_call)], name


def test_the_policy_reads_the_prompts_of_the_call(attached):
    pipe, handle, _, _ = attached
    policy = _Recording(8)
    handle.use(policy)
    try:
        _call(pipe, num_images_per_prompt=2)
    finally:
        handle.use(8)
    expected = encode_prompt_batch(pipe, PROMPTS)
    assert policy.batch.prompts == [p for p in PROMPTS for _ in range(2)]
    assert torch.equal(policy.batch.pooled, expected.pooled.repeat_interleave(2, 0))
    assert len(handle.last.reports) == 4 and policy.num_steps == STEPS


def test_bad_attach_and_detach_are_refused(attached, _tiny_pipeline_template, tmp_path):
    pipe = attached[0]
    with pytest.raises(ValueError, match="already has a quantization attached"):
        qlip.attach_quantization(pipe, _job(), PROMPTS)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    with pytest.raises(ValueError, match="calibration_prompts"):
        qlip.attach_quantization(fresh, _job())
    with pytest.raises(FileNotFoundError):
        qlip.attach_quantization(fresh, tmp_path / "missing")
    with pytest.raises(ValueError, match="no quantization is attached"):
        qlip.detach_quantization(fresh)
    assert not quant_units(fresh.unet)


def test_the_pipelines_scheduler_arguments_reach_the_scheduler(attached):
    # diffusers passes eta/generator to step and timesteps/sigmas to set_timesteps only where
    # the scheduler's signature names them: the session's wrapper must show the wrapped ones
    pipe, _, _, scheduler = attached
    for name in ("step", "set_timesteps"):
        assert (inspect.signature(getattr(pipe.scheduler, name)).parameters.keys()
                == inspect.signature(getattr(scheduler, name)).parameters.keys()), name
    assert "eta" in inspect.signature(pipe.scheduler.step).parameters  # DDIM's
    assert not np.array_equal(_call(pipe, eta=1.0), _call(pipe, eta=0.0))  # eta reached it


def test_detach_restores_the_fp_pipeline_bit_for_bit(attached):
    pipe, _, fp, scheduler = attached
    qlip.detach_quantization(pipe)
    assert not hasattr(pipe, "qlip") and not quant_units(pipe.unet)
    assert pipe.scheduler is scheduler and not pipe.unet._forward_pre_hooks
    assert np.array_equal(_call(pipe), fp)


def test_a_saved_quantization_attaches_to_a_fresh_pipeline(_tiny_pipeline_template, tmp_path):
    pipe = copy.deepcopy(_tiny_pipeline_template)
    qlip.attach_quantization(pipe, _job(), PROMPTS, out_dir=tmp_path, progress=False)
    images = _call(pipe)
    other = copy.deepcopy(_tiny_pipeline_template)
    qlip.attach_quantization(other, tmp_path, abits=8)
    assert np.array_equal(_call(other), images)
    assert other.qlip.source == str(tmp_path)


def test_sdxl_policy_reads_the_second_towers_projected_pooled_embedding(tmp_path):
    pipe = build_tiny_sdxl_pipeline(tmp_path)
    session = SamplingSession(pipe, None)  # FP: no units, the session still counts and reports
    try:
        policy = _Recording(8)
        policy.unit_names = []
        session.policy = policy
        pipe(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, output_type="latent")
    finally:
        session.close()
    expected = encode_prompt_batch(pipe, PROMPTS)  # text_encoder_2's text_embeds
    assert torch.equal(policy.batch.pooled, expected.pooled)
    assert policy.batch.pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert [r.fab for r in session.last.reports] == [32.0, 32.0]
    assert session.last.reports[0].steps == 2
