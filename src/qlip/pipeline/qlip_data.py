"""QLIP's data from real pipeline runs: FP generations for T2Q's labels (resumable, in chunks),
and FP trajectories for Q2B with each row's prompt index (both guidance halves)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..methods.calib_data import CalibrationSet
from ..methods.runner import full_precision
from ..nn import quant_units
from .capture import capture_unet_inputs
from .prompts import encode_prompt_batch


@dataclass
class T2QDataConfig:
    num_prompts: int = 10_000  # N, the paper's 10k generations
    steps: int = 25
    guidance: float = 7.5
    chunk: int = 64  # prompts per saved chunk (the unit of resumption)
    batch_size: int = 16
    seed: int = 0  # image i uses seed + i
    progress: bool = True


def generate_t2q_data(
    pipe, prompts: Sequence[str], features: Callable[[torch.Tensor], torch.Tensor],
    out_dir: str | Path, config: T2QDataConfig | None = None,
) -> dict[str, torch.Tensor]:
    """FP images of ``prompts`` (the first ``num_prompts``) turned into image ``features`` (a
    callable on [B, 3, H, W] images in [0, 1], e.g. Inception pool3) and the prompts' pooled text
    embeddings; chunks saved in ``out_dir`` are kept and skipped on a rerun. Returns
    ``{"pooled": [N, C], "features": [N, D]}``. Score them with GIQA afterwards.

    >>> data = generate_t2q_data(pipe, prompts, extractor.global_features, "runs/t2q-data")  # doctest: +SKIP
    """
    config = config or T2QDataConfig()
    prompts = list(prompts)[: config.num_prompts]
    if not prompts:
        raise ValueError("generate_t2q_data needs at least one prompt")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = range(0, len(prompts), config.chunk)
    for start in tqdm(chunks, desc="T2Q data", disable=not config.progress):
        path = out / f"chunk_{start:07d}.safetensors"
        if not path.exists():
            save_file(_chunk(pipe, prompts[start : start + config.chunk], start, features, config),
                      str(path))
    parts = [load_file(str(out / f"chunk_{s:07d}.safetensors")) for s in chunks]
    return {k: torch.cat([p[k] for p in parts]) for k in ("pooled", "features")}


@torch.no_grad()
def _chunk(pipe, prompts: list[str], start: int, features, config: T2QDataConfig) -> dict:
    pooled, feats = [], []
    with full_precision(quant_units(pipe.unet)):
        for b in range(0, len(prompts), config.batch_size):
            batch = prompts[b : b + config.batch_size]
            seeds = range(config.seed + start + b, config.seed + start + b + len(batch))
            gens = [torch.Generator(pipe.unet.device).manual_seed(s) for s in seeds]
            images = pipe(batch, num_inference_steps=config.steps, guidance_scale=config.guidance,
                          generator=gens, output_type="np").images
            images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()
            feats.append(features(images).float().cpu())
            pooled.append(encode_prompt_batch(pipe, batch).pooled.cpu())
    return {"pooled": torch.cat(pooled).contiguous(), "features": torch.cat(feats).contiguous()}


def capture_trajectories(
    pipe, prompts: Sequence[str], steps: int = 25, guidance: float = 7.5, batch_size: int = 8,
    seed: int = 0, progress: bool = True,
) -> tuple[CalibrationSet, torch.Tensor]:
    """FP trajectories (every step, both guidance halves) of ``prompts`` and each row's prompt
    index ``[N]`` (rows of one call are ``[uncond b, cond b]``), for Q2B training.

    >>> rows, prompt_of_row = capture_trajectories(pipe, prompts, steps=25)  # doctest: +SKIP
    """
    prompts = list(prompts)
    sets, index = [], []
    halves = 2 if guidance > 1.0 else 1
    with full_precision(quant_units(pipe.unet)):
        for start in tqdm(range(0, len(prompts), batch_size), desc="trajectories", disable=not progress):
            batch = prompts[start : start + batch_size]
            data = capture_unet_inputs(pipe, batch, steps, guidance, seed=seed + start,
                                       batch_size=len(batch), progress=False)
            per_call = torch.arange(start, start + len(batch)).repeat(halves)
            index.append(per_call.repeat(len(data) // len(per_call)))
            sets.append(data)
    rows = sets[0] if len(sets) == 1 else _cat(sets)
    return rows, torch.cat(index)


def _cat(sets: list[CalibrationSet]) -> CalibrationSet:
    return CalibrationSet.from_inputs(
        type(sets[0].inputs()).cat([s.inputs() for s in sets]), torch.cat([s.steps for s in sets]))
