"""Capturing calibration data: the UNet's inputs (x_t, t, c and every conditioning input the
pipeline passes, e.g. SDXL's ``added_cond_kwargs``) from a real pipeline run, both halves of
classifier-free guidance, at chosen sampling steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.calib_data import CalibrationSet
from ..methods.unet_inputs import UNetInputs
from .prompts import check_prompts
from .resolution import pipeline_resolution


class _InputRecorder:
    """UNet forward pre-hook: keeps every input of the calls at the kept step indices."""

    def __init__(self, keep_steps: set[int] | None):
        self.keep_steps = keep_steps
        self.step = 0
        self.rows: list[UNetInputs] = []
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs):
        if self.keep_steps is None or self.step in self.keep_steps:
            inputs = UNetInputs.from_call(args, kwargs).rows()
            self.rows.append(inputs)
            self.steps.append(torch.full((inputs.batch_size,), self.step, dtype=torch.long))
        self.step += 1


def uniform_steps(num_inference_steps: int, count: int) -> list[int]:
    """``count`` step indices spread uniformly over the schedule (Q-Diffusion's cali_st)."""
    count = min(count, num_inference_steps)
    return sorted({round(i * (num_inference_steps - 1) / max(count - 1, 1)) for i in range(count)})


@torch.no_grad()
def capture_unet_inputs(
    pipe,
    prompts: Sequence[str],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    keep_steps: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    height: int | None = None,
    width: int | None = None,
) -> CalibrationSet:
    """Run the FP pipeline on ``prompts`` and record the UNet's inputs at ``keep_steps`` (all steps
    when None). With guidance, each call holds the unconditional and the conditional half: both kept.
    Every keyword input the pipeline passes the UNet is kept (:class:`UNetInputs`).

    >>> data = capture_unet_inputs(pipe, ["a red circle"], 25, keep_steps=[0, 12, 24])  # doctest: +SKIP
    """
    prompts = list(prompts)
    check_prompts(pipe, prompts, truncate=True)
    keep = set(keep_steps) if keep_steps is not None else None
    unet: nn.Module = pipe.unet
    height, width = pipeline_resolution(pipe, height, width)
    rows: list[UNetInputs] = []
    steps: list[torch.Tensor] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="capturing", disable=not progress):
        batch = prompts[start : start + batch_size]
        recorder = _InputRecorder(keep)
        handle = unet.register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            generator = torch.Generator(unet.device).manual_seed(seed + start)
            pipe(batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=generator, output_type="latent", height=height, width=width)
        finally:
            handle.remove()
        rows.extend(recorder.rows)
        steps.extend(recorder.steps)
    if not rows:
        raise ValueError(f"no UNet call matched keep_steps={sorted(keep or [])}")
    return CalibrationSet.from_inputs(UNetInputs.cat(rows), torch.cat(steps))
