"""Capturing calibration data: the UNet's inputs (x_t, t, c) from a real pipeline run, both halves
of classifier-free guidance, at chosen sampling steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.calib_data import CalibrationSet
from .prompts import check_prompts


class _InputRecorder:
    def __init__(self, keep_steps: set[int] | None):
        self.keep_steps = keep_steps
        self.step = 0
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if self.keep_steps is None or self.step in self.keep_steps:
            t = torch.as_tensor(timestep, device=sample.device).flatten().expand(sample.shape[0])
            steps = torch.full((sample.shape[0],), self.step, dtype=torch.long)
            self.rows.append((sample.cpu().float(), t.cpu().float(), context.cpu().float(), steps))
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
) -> CalibrationSet:
    """Run the FP pipeline on ``prompts`` and record the UNet's inputs at ``keep_steps`` (all steps
    when None). With guidance, each call holds the unconditional and the conditional half: both kept.
    """
    prompts = list(prompts)
    check_prompts(pipe, prompts, truncate=True)
    keep = set(keep_steps) if keep_steps is not None else None
    unet: nn.Module = pipe.unet
    rows: list[tuple[torch.Tensor, ...]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="capturing", disable=not progress):
        batch = prompts[start : start + batch_size]
        recorder = _InputRecorder(keep)
        handle = unet.register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            generator = torch.Generator(unet.device).manual_seed(seed + start)
            pipe(batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=generator, output_type="latent")
        finally:
            handle.remove()
        rows.extend(recorder.rows)
    if not rows:
        raise ValueError(f"no UNet call matched keep_steps={sorted(keep or [])}")
    return CalibrationSet(*(torch.cat(parts) for parts in zip(*rows)))
