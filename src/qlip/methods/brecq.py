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

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

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
def _checkpoint_meta(config: ReconstructionConfig, layers: dict[str, QuantLayer]) -> str:
    return json.dumps({"config": asdict(config),
                       "layers": {n: layer.wbits for n, layer in sorted(layers.items())}})


def _save_checkpoint(path: Path, layers: dict[str, QuantLayer], meta: str) -> None:
    tensors = {}
    for name, layer in layers.items():
        for i, (codes, quantizer) in enumerate(zip(layer.weight_codes(), layer.weight_quantizers)):
            tensors[f"{name}.codes{i}"] = codes.contiguous().cpu()
            tensors[f"{name}.scale{i}"] = quantizer.scale.detach().contiguous().cpu()
            tensors[f"{name}.zero{i}"] = quantizer.zero_point.contiguous().cpu()
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"qlip-reconstruction": meta})
    os.replace(temporary, path)  # a crash mid-write never leaves a half checkpoint


def _load_checkpoint(path: Path, layers: dict[str, QuantLayer], meta: str) -> None:
    with safe_open(str(path), framework="pt") as file:
        if file.metadata().get("qlip-reconstruction") != meta:
            raise ValueError(
                f"{path} was written by a reconstruction with another config or model; delete "
                f"{path.parent} to start over, or resume with the same settings"
            )
        for name, layer in layers.items():
            codes = []
            for i, quantizer in enumerate(layer.weight_quantizers):
                with torch.no_grad():
                    quantizer.scale.copy_(file.get_tensor(f"{name}.scale{i}"))
                    quantizer.zero_point.copy_(file.get_tensor(f"{name}.zero{i}"))
                codes.append(file.get_tensor(f"{name}.codes{i}").to(quantizer.scale.device))
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
    meta = _checkpoint_meta(config, layers)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(len(data), config.num_samples, config.seed)
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
            if path is not None and path.is_file():
                _load_checkpoint(path, inner, meta)
            else:
                _reconstruct_unit(unet, units, module, name, inner, data, rows, config,
                                  config.seed + index, progress)
                if path is not None:
                    _save_checkpoint(path, inner, meta)
            done.append(name)
            if on_unit_done is not None:
                on_unit_done(name)
    return done
