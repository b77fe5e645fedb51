"""PTQD at the diffusers seam: gathering the correction statistics on DDIM trajectories (FP and
quantized UNets side by side on the same inputs), and a scheduler wrapper that corrects the
quantized noise prediction before every step.

With DDIM the wrapper applies the whole correction (bias, k_t and, for η > 0, the reduced step
noise); with any other scheduler (PNDM, the SD 1.x default, ...) only the bias and k_t
correction of ε, which every ε-prediction scheduler consumes the same way. When sampling at
timesteps other than those the statistics were gathered at, they are interpolated by timestep.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..methods.ptqd import CorrectionStats, PTQDConfig, correct_noise, gathered_statistics
from ..methods.ptqd import reduced_noise_std as _reduced_noise_std
from ..methods.runner import full_precision
from ..methods.unet_inputs import UNetInputs, call_unet
from ..nn import QuantUnit
from .prompts import check_prompts
from .resolution import pipeline_resolution


class _PairRecorder:
    """UNet hooks: before each call, tell the units the step index; after it, run the same inputs
    through the FP model and keep both guidance-combined predictions (on CPU)."""

    def __init__(self, units: dict[str, QuantUnit], guidance: float):
        self.units, self.guidance = units, guidance
        self.step, self.busy = 0, False
        self.eps_fp: dict[int, list[torch.Tensor]] = {}
        self.eps_q: dict[int, list[torch.Tensor]] = {}
        self.timesteps: dict[int, float] = {}

    def _combine(self, eps: torch.Tensor) -> torch.Tensor:
        if self.guidance <= 1.0:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def before(self, module, args, kwargs):
        if not self.busy:
            for unit in self.units.values():
                unit.set_step(self.step)

    def after(self, module, args, kwargs, output):
        if self.busy:
            return
        inputs = UNetInputs.from_call(args, kwargs)  # every conditioning input, SDXL's included
        self.busy = True
        try:
            with torch.no_grad(), full_precision(self.units):
                eps_fp = call_unet(module, inputs)
        finally:
            self.busy = False
        eps_q = output[0] if isinstance(output, tuple) else output.sample
        self.timesteps[self.step] = float(torch.as_tensor(inputs.timestep).flatten()[0])
        self.eps_q.setdefault(self.step, []).append(self._combine(eps_q).float().cpu())
        self.eps_fp.setdefault(self.step, []).append(self._combine(eps_fp).float().cpu())
        self.step += 1


@torch.no_grad()
def gather_correction_statistics(
    pipe, units: dict[str, QuantUnit], prompts: Sequence[str], config: PTQDConfig | None = None,
    progress: bool = True,
) -> CorrectionStats:
    """Sample ``config.num_prompts`` DDIM (η = 0) trajectories with the quantized UNet and, at each
    step, compare its guidance-combined ε with the FP UNet's on the same inputs."""
    from diffusers import DDIMScheduler

    config = config or PTQDConfig()
    prompts = list(prompts)[: config.num_prompts]
    check_prompts(pipe, prompts, truncate=True)
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    recorder = _PairRecorder(units, config.guidance)
    height, width = pipeline_resolution(pipe, config.height, config.width)
    unet = pipe.unet
    handles = [unet.register_forward_pre_hook(recorder.before, with_kwargs=True),
               unet.register_forward_hook(recorder.after, with_kwargs=True)]
    try:
        for start in tqdm(range(0, len(prompts), config.batch_size), desc="PTQD statistics",
                          disable=not progress):
            recorder.step = 0
            generator = torch.Generator(unet.device).manual_seed(config.seed + start)
            pipe(prompts[start : start + config.batch_size], num_inference_steps=config.num_steps,
                 guidance_scale=config.guidance, generator=generator, eta=0.0,
                 output_type="latent", height=height, width=width)
    finally:
        for handle in handles:
            handle.remove()
        pipe.scheduler = original
    steps = sorted(recorder.eps_q)
    return gathered_statistics(
        [torch.cat(recorder.eps_fp[s]) for s in steps], [torch.cat(recorder.eps_q[s]) for s in steps],
        [recorder.timesteps[s] for s in steps], "DDIMScheduler",
    )


class PTQDScheduler:
    """Wraps a diffusers scheduler: ``step`` corrects the quantized ε with PTQD's statistics, then
    calls the wrapped scheduler; everything else (``set_timesteps``, ``timesteps``,
    ``init_noise_sigma``, ``scale_model_input``, ``config``, ``order``...) is the wrapped one's.

    >>> pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)  # doctest: +SKIP
    """

    def __init__(self, scheduler, stats: CorrectionStats):
        from diffusers import DDIMScheduler

        self.scheduler = scheduler
        self.stats = stats
        self.is_ddim = isinstance(scheduler, DDIMScheduler)
        self._step_parameters = set(inspect.signature(scheduler.step).parameters)
        if not self.is_ddim:
            warnings.warn(
                f"PTQD with {type(scheduler).__name__}: only the bias and k_t correction of ε is "
                "applied (the variance correction needs DDIMScheduler)", stacklevel=2)

    def __getattr__(self, name: str):
        if name == "scheduler":  # not set yet (copy/unpickle): avoid recursing
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    # set_timesteps is not defined here: __getattr__ gives the wrapped scheduler's own, whose
    # signature diffusers reads (custom ``timesteps`` / ``sigmas``)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, *args, **kwargs)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             generator=None, **kwargs):
        k, bias, sigma_q = self.stats.at(float(torch.as_tensor(timestep).flatten()[0]))
        eps = correct_noise(model_output, k, bias)
        if "eta" in self._step_parameters:
            kwargs["eta"] = eta
        if "generator" in self._step_parameters:
            kwargs["generator"] = generator
        if self.is_ddim and eta > 0 and kwargs.get("variance_noise") is None:
            sigma_corrected = float(sigma_q) / (1.0 + max(float(k), 0.0))
            kwargs["variance_noise"] = self._reduced_noise(eps, int(timestep), eta,
                                                           sigma_corrected, generator)
            kwargs["generator"] = None  # DDIM refuses both a generator and variance_noise
        return self.scheduler.step(eps, timestep, sample, **kwargs)

    def _reduced_noise(self, eps: torch.Tensor, timestep: int, eta: float, sigma_q: float,
                       generator) -> torch.Tensor:
        """Noise that DDIM scales by its σ_t so that the added noise has PTQD's std σ_t'."""
        from diffusers.utils.torch_utils import randn_tensor

        s = self.scheduler
        prev = timestep - s.config.num_train_timesteps // s.num_inference_steps
        alpha_t = float(s.alphas_cumprod[timestep])
        alpha_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
        sigma_t = eta * float(s._get_variance(timestep, prev)) ** 0.5
        sigma_new = _reduced_noise_std(sigma_t, alpha_t, alpha_prev, sigma_q)
        noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        return noise * (sigma_new / sigma_t if sigma_t > 0 else 0.0)


def apply_ptqd(pipe, stats: CorrectionStats) -> PTQDScheduler:
    """Wrap ``pipe.scheduler`` (once) so that sampling applies PTQD's correction."""
    if isinstance(pipe.scheduler, PTQDScheduler):
        pipe.scheduler = pipe.scheduler.scheduler
    pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)
    return pipe.scheduler


def remove_ptqd(pipe) -> None:
    """Give the pipeline back its own scheduler."""
    if isinstance(pipe.scheduler, PTQDScheduler):
        pipe.scheduler = pipe.scheduler.scheduler


def apply_saved_correction(pipe, extra: dict[str, torch.Tensor]) -> PTQDScheduler | None:
    """Wrap the scheduler when a loaded model (``QuantizedInfo.extra``) carries PTQD statistics."""
    stats = CorrectionStats.from_extra(extra)
    return apply_ptqd(pipe, stats) if stats is not None else None
