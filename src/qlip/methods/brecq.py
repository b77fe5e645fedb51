"""BRECQ reconstruction with AdaRound (Q-Diffusion's weight calibration).

The UNet is cut into reconstruction units, visited in execution order: blocks (diffusers
``ResnetBlock2D`` and ``BasicTransformerBlock``) and every quantized layer outside a block
(conv_in, conv_out, time embedding, down/upsamplers, proj_in/proj_out). For each unit the inputs
come from the already-quantized prefix and the targets from the full-precision model (both captured
by running the UNet with hooks and stopping at the unit, streamed to CPU); the rounding variables
of the unit's weights are trained to reproduce the targets, then frozen to integer codes.

Activations stay in full precision during weight reconstruction, as in Q-Diffusion. After each
unit its codes are written to ``checkpoint_dir``; a restarted run loads finished units and
continues with the next one, and ends bit-identical to an uninterrupted run. The generic parts
(running rows, capturing a unit, the full-precision context, the optimiser loop) are in
``methods.runner``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import crash_point, load_tensors, note, read_tensor_metadata, save_tensors
from ..nn import QuantLayer, QuantUnit
from ..quant import BYPASS_BITS
from ..quant.adaround import AdaRoundQuantizer, annealed_beta
from .calib_data import CalibrationSet
from .runner import (
    BLOCK_TYPES,
    CachedCalls,
    activations_bypassed,
    capture_unit,
    execution_order,
    full_precision,
    optimise_unit,
    sample_rows,
    weight_quantizers_replaced,
)


@dataclass(frozen=True)
class ReconstructionConfig:
    """BRECQ/AdaRound hyper-parameters; the paper's (Q-Diffusion's) values in the comments."""

    iters: int = 1000  # Q-Diffusion: 20,000 per block (too slow for our budget: docs/methods.md);
    # 0 = no reconstruction (round-to-nearest on the weight grid)
    batch_size: int = 8  # Q-Diffusion: 8
    lr: float = 1e-3  # Adam on the rounding variables only; Q-Diffusion: 1e-3
    reg_weight: float = 0.01  # rounding regulariser weight; Q-Diffusion: 0.01
    beta_start: float = 20.0  # β annealed from 20 ...
    beta_end: float = 2.0  # ... to 2
    warmup: float = 0.2  # fraction of iterations without regulariser; Q-Diffusion: 0.2
    num_samples: int = 256  # calibration rows used; Q-Diffusion: all 25 × 256 = 6,400
    capture_batch: int = 32  # rows per UNet pass while caching unit inputs/targets
    device_cache_mb: int = 2048  # keep a unit's cached inputs on the GPU when smaller than this
    seed: int = 0
    block_types: tuple[str, ...] = BLOCK_TYPES

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("reconstruction iters must be >= 0, batch_size and num_samples >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1); got {self.warmup}")


# -- training ------------------------------------------------------------------------------------
def train_rounding(
    module: nn.Module, layers: dict[str, QuantLayer], inputs: CachedCalls, targets: torch.Tensor,
    config: ReconstructionConfig, seed: int, desc: str, progress: bool,
) -> dict[str, list[torch.Tensor]]:
    """AdaRound on every weight of ``layers`` (all inside ``module``); returns their codes."""
    rounders = {n: [AdaRoundQuantizer(q, w) for q, w in zip(layer.weight_quantizers,
                                                             layer.weight_slices())]
                for n, layer in layers.items()}
    every = [r for rs in rounders.values() for r in rs]

    def penalty(iteration: int) -> torch.Tensor | None:
        beta = annealed_beta(iteration, config.iters, config.warmup, config.beta_start,
                             config.beta_end)
        if beta is None:
            return None
        return config.reg_weight * sum(r.regularizer(beta) for r in every)

    with ExitStack() as stack:
        for name, layer in layers.items():
            stack.enter_context(weight_quantizers_replaced(layer, rounders[name]))
        optimise_unit(module, [r.alpha for r in every], inputs, targets, config.iters,
                      config.batch_size, config.lr, seed, penalty=penalty, desc=desc,
                      progress=progress)
    return {n: [r.codes() for r in rs] for n, rs in rounders.items()}


# -- checkpoints ---------------------------------------------------------------------------------
CHECKPOINT_REMEDY = "delete it (that unit is reconstructed again)"


def _checkpoint_meta(config: ReconstructionConfig, layers: dict[str, QuantLayer],
                     data: CalibrationSet, rows: torch.Tensor) -> str:
    """What a checkpoint is made from: the config, the layers' bits and the calibration rows."""
    h = hashlib.sha256()
    for column in (data.latents, data.timesteps, data.text):
        h.update(column[rows].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return json.dumps({"config": asdict(config), "data": h.hexdigest()[:16],
                       "layers": {n: layer.wbits for n, layer in sorted(layers.items())}})


def _save_checkpoint(path: Path, layers: dict[str, QuantLayer], meta: str) -> None:
    tensors = {}
    for name, layer in layers.items():
        for i, (codes, quantizer) in enumerate(zip(layer.weight_codes(), layer.weight_quantizers)):
            tensors[f"{name}.codes{i}"] = codes.contiguous().cpu()
            tensors[f"{name}.scale{i}"] = quantizer.scale.detach().contiguous().cpu()
            tensors[f"{name}.zero{i}"] = quantizer.zero_point.contiguous().cpu()
    # atomically: a crash mid-write never leaves a half checkpoint
    save_tensors(tensors, path, metadata={"qlip-reconstruction": meta})


def _checkpoint_matches(path: Path, meta: str) -> bool:
    """Was the checkpoint made from this config, these layers and this calibration data?"""
    return read_tensor_metadata(path, CHECKPOINT_REMEDY).get("qlip-reconstruction") == meta


def _load_checkpoint(path: Path, layers: dict[str, QuantLayer]) -> None:
    tensors, _ = load_tensors(path, CHECKPOINT_REMEDY)
    for name, layer in layers.items():
        codes = []
        for i, quantizer in enumerate(layer.weight_quantizers):
            with torch.no_grad():
                quantizer.scale.copy_(tensors[f"{name}.scale{i}"])
                quantizer.zero_point.copy_(tensors[f"{name}.zero{i}"])
            codes.append(tensors[f"{name}.codes{i}"].to(quantizer.scale.device))
        layer.set_weight_codes(codes)


def _reconstruct_unit(
    unet: nn.Module, units: dict[str, QuantUnit], module: nn.Module, name: str,
    layers: dict[str, QuantLayer], data: CalibrationSet, rows: torch.Tensor,
    config: ReconstructionConfig, seed: int, progress: bool,
) -> None:
    """Capture the unit's inputs (quantized prefix) and targets (FP), train, freeze the codes."""
    inputs = capture_unit(unet, units, module, data, rows, config, want_output=False)
    with full_precision(units):
        targets = capture_unit(unet, units, module, data, rows, config, True)
    codes = train_rounding(module, layers, inputs, targets.to(inputs.device), config, seed, name,
                           progress)
    for layer_name, layer in layers.items():
        layer.set_weight_codes(codes[layer_name])


def reconstruct_weights(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    config: ReconstructionConfig | None = None, checkpoint_dir: str | Path | None = None,
    progress: bool = True, on_unit_done: Callable[[str], None] | None = None,
) -> list[str]:
    """Block/layer reconstruction of every quantized weight (their grids must be set, e.g. by
    ``QuantLayer.calibrate_weight``). Returns the units reconstructed, in order.

    >>> reconstruct_weights(unet, units, data, ReconstructionConfig(iters=200))  # doctest: +SKIP
    """
    config = config or ReconstructionConfig()
    if config.iters == 0:
        return []
    layers = {n: u for n, u in units.items()
              if isinstance(u, QuantLayer) and u.wbits < BYPASS_BITS}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(len(data), config.num_samples, config.seed)
    meta = _checkpoint_meta(config, layers, data, rows)
    resumed = stale = 0
    done = []
    with activations_bypassed(units):
        order = execution_order(unet, units, data, config.block_types)
        bar = tqdm(order, desc="reconstruction", disable=not progress)
        for index, (name, module) in enumerate(bar):
            inner = {n: layer for n, layer in layers.items()
                     if n == name or n.startswith(name + ".")}
            if not inner:
                continue
            path = folder / f"{index:03d}-{name}.safetensors" if folder is not None else None
            if path is not None and path.is_file() and _checkpoint_matches(path, meta):
                _load_checkpoint(path, inner)
                resumed += 1
            else:
                stale += path is not None and path.is_file()
                _reconstruct_unit(unet, units, module, name, inner, data, rows, config,
                                  config.seed + index, progress)
                if path is not None:
                    _save_checkpoint(path, inner, meta)
            done.append(name)
            if on_unit_done is not None:
                on_unit_done(name)
            crash_point("reconstruction-unit")
    if resumed:
        note(f"reconstruction resumed: {resumed} units read from the checkpoints in {folder}")
    if stale:
        note(f"reconstruction: {stale} checkpoints in {folder} were made from other settings or "
             "calibration data; those units were reconstructed anew")
    return done
