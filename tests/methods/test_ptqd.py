"""PTQD: statistics and correction on synthetic errors, the DDIM variance formula, the scheduler
wrapper, and a quantize → save → load → generate round trip on a tiny pipeline."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.ptqd import (
    CorrectionStats,
    PTQDConfig,
    correct_noise,
    reduced_noise_std,
    step_statistics,
)
from qlip.methods.qdiffusion import QDiffusionConfig
from qlip.nn import QuantConfig
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    PTQDScheduler,
    QuantizeJob,
    apply_ptqd,
    generate,
    load_quantized,
    quantize_pipeline,
    remove_ptqd,
)
from qlip.pipeline.ptqd_sampling import apply_saved_correction

K, BIAS, NOISE = 0.2, torch.tensor([0.1, -0.2, 0.05, 0.3]), 0.05
PROMPTS = ["a red circle", "two blue squares"]
GEN = GenerationConfig(steps=5, guidance=3.0, batch_size=2)


def _synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    eps_fp = torch.randn(64, 4, 8, 8, generator=g)
    noise = NOISE * torch.randn(64, 4, 8, 8, generator=g)
    return eps_fp, (1 + K) * eps_fp + BIAS[None, :, None, None] + noise


def test_statistics_recover_a_known_correlated_error_bias_and_noise():
    eps_fp, eps_q = _synthetic()
    k, bias, sigma = step_statistics(eps_fp, eps_q)
    assert float(k) == pytest.approx(K, abs=0.005)
    assert torch.allclose(bias, BIAS, atol=0.005)
    assert float(sigma) == pytest.approx(NOISE, rel=0.05)
    corrected = correct_noise(eps_q, k, bias)
    before = (eps_q - eps_fp).pow(2).mean().sqrt()
    after = (corrected - eps_fp).pow(2).mean().sqrt()
    assert before > 0.2 and float(after) == pytest.approx(NOISE / (1 + K), rel=0.05)


def test_negative_k_is_not_used_to_scale():
    eps_fp = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_q = 0.8 * eps_fp + 0.1
    k, bias, _ = step_statistics(eps_fp, eps_q)
    assert float(k) == pytest.approx(-0.2, abs=1e-4)
    mean_error = (eps_q - eps_fp).mean(dim=(0, 2, 3))
    assert torch.allclose(bias, mean_error, atol=1e-5)  # relu(k) = 0: the bias is the mean of e
    unscaled = eps_q - bias[None, :, None, None]
    assert torch.allclose(correct_noise(eps_q, k, bias), unscaled, atol=1e-6)


def test_reduced_ddim_noise_matches_a_hand_computed_case():
    # σ=0.5, ᾱ_t=0.5, ᾱ_prev=0.6, σ_q=0.3: coefficient √0.15 - √0.6 = -√0.15,
    # σ'² = 0.25 - 0.15·0.09 = 0.2365
    assert reduced_noise_std(0.5, 0.5, 0.6, 0.3) == pytest.approx(math.sqrt(0.2365), abs=1e-9)
    assert reduced_noise_std(0.5, 0.5, 0.6, 10.0) == 0.0  # floored
    assert reduced_noise_std(0.5, 0.5, 0.6, 0.0) == 0.5


def _stats(num_steps=4):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    return CorrectionStats(k=torch.linspace(0.1, 0.4, num_steps),
                           bias=torch.arange(num_steps * 4.0).reshape(num_steps, 4) / 100,
                           sigma_q=torch.full((num_steps,), 0.2),
                           timesteps=scheduler.timesteps.float(), num_steps=num_steps,
                           scheduler="DDIMScheduler")


def test_statistics_are_looked_up_by_step_and_interpolated_between_timesteps():
    stats = _stats()
    t = stats.timesteps
    k, bias, _ = stats.at(float(t[1]))
    assert float(k) == pytest.approx(0.2) and torch.equal(bias, stats.bias[1])
    with pytest.warns(UserWarning, match="interpolated"):
        k_mid, bias_mid, _ = stats.at(float(t[1] + t[2]) / 2)
    assert float(k_mid) == pytest.approx(0.25)
    assert torch.allclose(bias_mid, (stats.bias[1] + stats.bias[2]) / 2)
    assert float(stats.at(5000.0)[0]) == pytest.approx(0.1)  # clamped at the ends


def test_ddim_wrapper_corrects_eps_and_reduces_the_step_noise():
    stats = _stats()
    ddim = DDIMScheduler(num_train_timesteps=1000)
    wrapper = PTQDScheduler(copy.deepcopy(ddim), stats)
    wrapper.set_timesteps(4)
    ddim.set_timesteps(4)
    assert torch.equal(wrapper.timesteps, ddim.timesteps) and wrapper.order == ddim.order
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(ddim.timesteps[1])
    k, bias, sigma_q = stats.at(float(t))
    eps_hat = correct_noise(eps, k, bias)
    assert torch.equal(wrapper.step(eps, t, x).prev_sample, ddim.step(eps_hat, t, x).prev_sample)
    # η = 1: the same noise draw, scaled by σ'/σ
    prev = t - 1000 // 4
    sigma = float(ddim._get_variance(t, prev)) ** 0.5
    sigma_new = reduced_noise_std(sigma, float(ddim.alphas_cumprod[t]),
                                  float(ddim.alphas_cumprod[prev]), float(sigma_q) / (1 + float(k)))
    assert 0 < sigma_new < sigma
    got = wrapper.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
    z = torch.randn(eps.shape, generator=torch.Generator().manual_seed(3))
    want = ddim.step(eps_hat, t, x, eta=1.0, variance_noise=z * sigma_new / sigma)
    assert torch.allclose(got.prev_sample, want.prev_sample, atol=1e-6)


def test_pndm_wrapper_applies_the_bias_and_scale_correction_only():
    stats = _stats()
    with pytest.warns(UserWarning, match="only the bias and k_t"):
        wrapper = PTQDScheduler(PNDMScheduler(skip_prk_steps=True), stats)
    pndm = PNDMScheduler(skip_prk_steps=True)
    wrapper.set_timesteps(5)
    pndm.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = int(pndm.timesteps[1])  # not one of the 4 DDIM timesteps the statistics were taken at
    assert float(t) not in stats.timesteps.tolist()
    with pytest.warns(UserWarning, match="interpolated"):
        k, bias, _ = stats.at(float(t))
        got = wrapper.step(eps, t, x, eta=0.0, generator=None).prev_sample
    assert torch.equal(got, pndm.step(correct_noise(eps, k, bias), t, x).prev_sample)


@pytest.fixture(scope="module")
def ptqd_model(_tiny_pipeline_template, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptqd")
    pipe = copy.deepcopy(_tiny_pipeline_template)
    qdiffusion = QDiffusionConfig(
        reconstruction=ReconstructionConfig(iters=0),  # nearest rounding: test_qdiffusion covers it
        act_init_samples=4, act_init_values=4096)
    job = QuantizeJob(
        method="ptqd", quant=QuantConfig(wbits=4, abits=8, preset="ptqd", weight_per_channel=False),
        calibration=CalibrationConfig(num_prompts=2, num_inference_steps=4, num_kept_steps=2,
                                      guidance=3.0),
        qdiffusion=qdiffusion,
        ptqd=PTQDConfig(qdiffusion=qdiffusion, num_prompts=2, num_steps=GEN.steps, guidance=3.0),
    )
    quantize_pipeline(pipe, PROMPTS, job, out, progress=False)
    return pipe, out


def test_ptqd_model_round_trip_restores_statistics_and_images(ptqd_model,
                                                               _tiny_pipeline_template):
    pipe, out = ptqd_model
    loaded = copy.deepcopy(_tiny_pipeline_template)
    info = load_quantized(loaded.unet, out)
    stats = CorrectionStats.from_extra(info.extra)
    assert stats.num_steps == GEN.steps and stats.scheduler == "DDIMScheduler"
    assert stats.k.shape == (GEN.steps,) and stats.bias.shape == (GEN.steps, 4)
    assert (stats.sigma_q > 0).all()  # the quantized UNet does differ from the FP one
    pipe.scheduler.set_timesteps(GEN.steps)
    assert torch.equal(stats.timesteps, pipe.scheduler.timesteps.float())
    apply_ptqd(pipe, stats)
    apply_saved_correction(loaded, info.extra)
    assert isinstance(loaded.scheduler, PTQDScheduler)
    images = [np.asarray(generate(p, PROMPTS, [0, 1], None, GEN, progress=False).images[0])
              for p in (pipe, loaded)]
    remove_ptqd(pipe)
    plain = np.asarray(generate(pipe, PROMPTS, [0, 1], None, GEN, progress=False).images[0])
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], plain)  # the correction changes the image
    assert isinstance(pipe.scheduler, DDIMScheduler)


def test_ptqd_job_refuses_per_channel_weights():
    with pytest.raises(ValueError, match="per tensor"):
        QuantizeJob(method="ptqd", quant=QuantConfig(preset="ptqd"))


def test_cli_maps_ptqd_flags_onto_the_job(monkeypatch, tmp_path):
    import qlip.pipeline as pipeline_module
    from qlip.cli import main

    jobs = []
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda model, device: None)
    monkeypatch.setattr(pipeline_module, "quantize_pipeline",
                        lambda pipe, prompts, job, out, **kw: jobs.append(job) or {})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code = main(["quantize", "--model", str(tmp_path), "--method", "ptqd", "--wbits", "4",
                 "--abits", "8", "--abits-options", "8,16,32", "--recon-iters", "7",
                 "--ptqd-prompts", "3", "--ptqd-steps", "9", "--calib-prompts", str(prompts),
                 "--out", str(tmp_path / "q")])
    assert code == 0
    job = jobs[0]
    assert job.method == "ptqd" and job.quant.preset == "ptqd"
    assert not job.quant.weight_per_channel and job.quant.abits_options == (8, 16, 32)
    assert job.ptqd.qdiffusion.reconstruction.iters == 7
    assert (job.ptqd.num_prompts, job.ptqd.num_steps) == (3, 9)


def test_cli_generate_wraps_the_scheduler_of_a_ptqd_model(ptqd_model, tiny_pipe_dir,
                                                          monkeypatch, tmp_path):
    import qlip.pipeline as pipeline_module
    from qlip.cli import main
    from qlip.pipeline import GenerationResult

    schedulers = []

    def fake_generate(pipe, prompts, seeds, policy, config):
        schedulers.append(pipe.scheduler)
        return GenerationResult()

    monkeypatch.setattr(pipeline_module, "generate", fake_generate)
    _, folder = ptqd_model
    code = main(["generate", "a red circle", "--model", str(tiny_pipe_dir), "--device", "cpu",
                 "--quantized", str(folder), "--steps", str(GEN.steps), "--out", str(tmp_path)])
    assert code == 0
    assert isinstance(schedulers[0], PTQDScheduler)
    assert schedulers[0].stats.num_steps == GEN.steps


def test_attach_applies_the_saved_correction_to_a_plain_pipe_call(ptqd_model,
                                                                  _tiny_pipeline_template):
    import qlip
    from qlip.pipeline.session import SessionScheduler

    _, folder = ptqd_model
    pipe = copy.deepcopy(_tiny_pipeline_template)
    original = pipe.scheduler
    qlip.attach_quantization(pipe, folder)
    assert isinstance(pipe.scheduler, SessionScheduler)
    assert isinstance(pipe.scheduler.scheduler, PTQDScheduler)

    def call(p):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return p(PROMPTS, num_inference_steps=GEN.steps, guidance_scale=GEN.guidance,
                 generator=generators, output_type="np").images

    corrected = call(pipe)
    assert pipe.qlip.last.reports[0].fab == 8.0
    plain = copy.deepcopy(_tiny_pipeline_template)
    load_quantized(plain.unet, folder)  # the same quantized UNet, no correction
    assert not np.array_equal(corrected, call(plain))
    loaded = copy.deepcopy(_tiny_pipeline_template)
    apply_saved_correction(loaded, load_quantized(loaded.unet, folder).extra)
    assert np.array_equal(corrected, call(loaded))  # the correction, as `qlip generate` applies it
    qlip.detach_quantization(pipe)
    assert pipe.scheduler is original
