"""QLIP's data from real pipeline runs, all in full precision and resumable in chunks of prompts
(:class:`~qlip.pipeline.cache.ChunkStore`): FP generations measured for T2Q's labels, FP
trajectories for Q2B (every step, both guidance halves, each row with its prompt's index), and
each prompt's quantization sensitivity along its FP trajectory. Prompt i always uses the seed
``seed + i`` (its own generator), so results do not depend on batch or chunk sizes' boundaries
and prompt i's trajectory is the one its T2Q image was drawn from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..methods.calib_data import CalibrationSet
from ..methods.qlip.sensitivity import per_prompt_mean, row_sensitivity
from ..methods.runner import full_precision
from ..methods.unet_inputs import UNetInputs
from ..nn import quant_units
from .cache import ChunkStore
from .capture import _InputRecorder
from .prompts import check_prompts, encode_prompt_batch

# images [B, 3, H, W] in [0, 1] and their prompts -> named per-image tensors, e.g.
# {"features": [B, D], "image_text": [B]}
Measure = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


@dataclass
class FPRunConfig:
    """How the FP runs over prompts sample (T2Q data, trajectories, sensitivity)."""

    steps: int = 25
    guidance: float = 4.0  # the reference world's; SD 1.x is usually sampled at 7.5
    seed: int = 0  # prompt i uses seed + i
    chunk: int = 64  # prompts per saved chunk (the unit of resumption)
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.chunk < 1 or self.batch_size < 1:
            raise ValueError(f"FPRunConfig needs steps, chunk and batch_size >= 1; got "
                             f"{self.steps}, {self.chunk}, {self.batch_size}")

    def fingerprint(self) -> dict:
        """What decides the results (not the batch size, the chunk size is the store's)."""
        return {"steps": self.steps, "guidance": self.guidance, "seed": self.seed}


def _generators(pipe, first_seed: int, count: int) -> list[torch.Generator]:
    device = pipe.unet.device
    return [torch.Generator(device).manual_seed(first_seed + i) for i in range(count)]


def _keys(prompts: Sequence[str]) -> list[str]:
    return [f"{i}\t{p}" for i, p in enumerate(prompts)]


@torch.no_grad()
def fp_images(pipe, prompts: list[str], first_seed: int, config: FPRunConfig) -> torch.Tensor:
    """FP images [n, 3, H, W] in [0, 1] of ``prompts`` (seeds ``first_seed + i``), even when the
    UNet holds quantized units (they are bypassed)."""
    out = []
    with full_precision(quant_units(pipe.unet)):
        for b in range(0, len(prompts), config.batch_size):
            batch = prompts[b : b + config.batch_size]
            images = pipe(batch, num_inference_steps=config.steps, guidance_scale=config.guidance,
                          generator=_generators(pipe, first_seed + b, len(batch)),
                          output_type="np").images
            out.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float())
    return torch.cat(out).clamp(0, 1)


def generate_t2q_data(
    pipe, prompts: Sequence[str], measure: Measure | None, out_dir: str | Path,
    config: FPRunConfig | None = None, fingerprint: dict | None = None, redo: bool = False,
) -> dict[str, torch.Tensor]:
    """FP images of ``prompts``, measured by ``measure`` (e.g. the evaluator's global features and
    image–text cosines), plus the prompts' pooled text embeddings; saved in chunks in ``out_dir``.
    ``fingerprint`` names what else decides the results (the model, the measure). Returns
    ``{"pooled": [N, C], **measure}``. Score them with GIQA afterwards. Without ``measure`` no
    image is generated: only the embeddings (a label that needs no image, e.g. sensitivity).

    >>> data = generate_t2q_data(pipe, prompts, measure, "runs/t2q-data")  # doctest: +SKIP
    """
    config = config or FPRunConfig()
    prompts = list(prompts)
    check_prompts(pipe, prompts, truncate=True)
    store = ChunkStore(out_dir, {"kind": "t2q-data", **config.fingerprint(), **(fingerprint or {})},
                       config.chunk, redo, "T2Q data set")

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        batch = prompts[start:stop]
        measured = {}
        if measure is not None:
            images = fp_images(pipe, batch, config.seed + start, config)
            measured = {k: v.float().cpu() for k, v in measure(images, batch).items()}
        return {"pooled": encode_prompt_batch(pipe, batch).pooled.float().cpu(), **measured}

    return store.run(_keys(prompts), compute, "T2Q data", config.progress)


@torch.no_grad()
def capture_trajectories(
    pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5, batch_size: int = 8,
    seed: int = 0, progress: bool = True,
) -> tuple[CalibrationSet, torch.Tensor]:
    """FP trajectories (every step, both guidance halves) of ``prompts`` (prompt i from seed
    ``seed + i``) and each row's prompt index ``[N]`` (rows of one call are
    ``[uncond b, cond b]``), for Q2B training.

    >>> rows, prompt_of_row = capture_trajectories(pipe, prompts, steps=25)  # doctest: +SKIP
    """
    prompts = list(prompts)
    check_prompts(pipe, prompts, truncate=True)
    rows, steps_of_row, index = [], [], []
    halves = 2 if guidance > 1.0 else 1
    with full_precision(quant_units(pipe.unet)):
        for start in tqdm(range(0, len(prompts), batch_size), desc="trajectories",
                          disable=not progress):
            batch = prompts[start : start + batch_size]
            recorder = _InputRecorder(None)
            handle = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
            try:
                pipe(batch, num_inference_steps=steps, guidance_scale=guidance,
                     generator=_generators(pipe, seed + start, len(batch)), output_type="latent")
            finally:
                handle.remove()
            per_call = torch.arange(start, start + len(batch)).repeat(halves)
            rows += recorder.rows
            steps_of_row += recorder.steps
            index += [per_call] * len(recorder.rows)
    data = CalibrationSet.from_inputs(UNetInputs.cat(rows), torch.cat(steps_of_row))
    return data, torch.cat(index)


def trajectory_data(
    pipe, prompts: Sequence[str], out_dir: str | Path, config: FPRunConfig | None = None,
    fingerprint: dict | None = None, redo: bool = False,
) -> tuple[CalibrationSet, torch.Tensor]:
    """:func:`capture_trajectories`, saved in chunks in ``out_dir`` (resumable)."""
    config = config or FPRunConfig()
    prompts = list(prompts)
    store = ChunkStore(out_dir, {"kind": "trajectories", **config.fingerprint(),
                                 **(fingerprint or {})}, config.chunk, redo, "trajectory set")

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        rows, index = capture_trajectories(pipe, prompts[start:stop], config.steps,
                                           config.guidance, config.batch_size,
                                           config.seed + start, progress=False)
        return rows.tensors() | {"prompt_of_row": index + start}

    tensors = store.run(_keys(prompts), compute, "trajectories", config.progress)
    index = tensors.pop("prompt_of_row")
    return CalibrationSet.from_tensors(tensors), index


def prompt_sensitivity(
    pipe, prompts: Sequence[str], bits: int, out_dir: str | Path,
    config: FPRunConfig | None = None, fingerprint: dict | None = None, redo: bool = False,
) -> torch.Tensor:
    """``[N]`` each prompt's ``mean((ε_fp − ε_q)²)`` with every dynamic unit at ``bits``, over its
    FP trajectory's rows (:func:`~qlip.methods.qlip.sensitivity.row_sensitivity`); chunked in
    ``out_dir``. ``fingerprint`` must name the quantized model."""
    config = config or FPRunConfig()
    prompts = list(prompts)
    units = quant_units(pipe.unet)
    store = ChunkStore(out_dir, {"kind": "sensitivity", "bits": bits, **config.fingerprint(),
                                 **(fingerprint or {})}, config.chunk, redo, "sensitivity set")

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        out = []
        for first in range(start, stop, config.batch_size):  # one batch's rows in memory
            last = min(first + config.batch_size, stop)
            rows, index = capture_trajectories(pipe, prompts[first:last], config.steps,
                                               config.guidance, config.batch_size,
                                               config.seed + first, progress=False)
            errors = row_sensitivity(pipe.unet, units, rows, bits, config.batch_size)
            out.append(per_prompt_mean(errors, index, last - first))
        return {"sensitivity": torch.cat(out)}

    return store.run(_keys(prompts), compute, f"sensitivity A{bits}", config.progress)["sensitivity"]
