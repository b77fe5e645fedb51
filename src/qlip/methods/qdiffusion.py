"""Q-Diffusion (Li et al., ICCV 2023): timestep-aware calibration data, BRECQ/AdaRound weights,
activation grids from an mse init followed by a running (EMA) min/max, optional LSQ-style tuning of
the activation step sizes. Layer policy: preset ``qdiffusion``; shortcut splitting is done by the
engine (``pipeline.prepare``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn import ActivationBank, QuantUnit
from .brecq import ReconstructionConfig, reconstruct_weights
from .calib_data import CalibrationSet
from .calibrate import activation_banks, calibrate_weights, freeze, observing
from .runner import (
    capture_unit,
    execution_order,
    full_precision,
    optimise_unit,
    run_rows,
    sample_rows,
)

CHECKPOINT_FOLDER = "reconstruction"


@dataclass(frozen=True)
class QDiffusionConfig:
    """Every hyper-parameter of Q-Diffusion; the paper's values in the comments."""

    weight_range: str = "mse"  # grid of the weights before AdaRound; Q-Diffusion: mse
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    act_init_samples: int = 16  # rows for the mse init of activation grids; Q-Diffusion: 16
    act_init_values: int = 65_536  # values kept per activation for the mse search (a subsample)
    act_momentum: float = 0.95  # running min/max over all calibration data; Q-Diffusion: 0.95
    act_tune_iters: int = 0  # LSQ tuning of Δ per unit; Q-Diffusion: 5,000 (optional); 0 = off
    act_tune_lr: float = 4e-4  # Adam, cosine schedule; Q-Diffusion: 4e-4
    act_tune_p: float = 2.4  # loss |x - x̂|^p; Q-Diffusion: 2.4
    act_tune_samples: int = 256
    batch_size: int = 8  # rows per UNet pass while observing activations
    # Rows per pass of the running min/max, shuffled across sampling steps (per-step tables:
    # one step per pass, passes shuffled). Small passes of one step each end on ranges far
    # narrower than the data's: on the reference model W8A8 lost 10x more than RTN that way.
    act_stat_batch: int = 64
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.reconstruction, dict):  # from a saved method config
            object.__setattr__(self, "reconstruction", ReconstructionConfig(**self.reconstruction))
        if not 0.0 <= self.act_momentum < 1.0:
            raise ValueError(f"act_momentum must be in [0, 1); got {self.act_momentum}")
        if self.act_init_samples < 1 or self.act_tune_iters < 0 or self.act_stat_batch < 1:
            raise ValueError("act_init_samples and act_stat_batch must be >= 1, "
                             "act_tune_iters >= 0")


class EmaRange:
    """Bank observer: Q-Diffusion's running min/max, ``r ← m·r + (1 - m)·r_batch``, kept for each
    bit-width of the bank at once (``low``/``high`` stacked on a first axis), each starting from
    its own mse range."""

    def __init__(self, momentum: float, low: torch.Tensor, high: torch.Tensor):
        self.momentum, self.low, self.high = momentum, low.clone(), high.clone()

    def __call__(self, x: torch.Tensor, step: int = 0) -> None:
        x = x.detach().float()
        m = self.momentum
        self.low = m * self.low + (1 - m) * x.amin().to(self.low)
        self.high = m * self.high + (1 - m) * x.amax().to(self.high)


def _mse_init(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet, config: QDiffusionConfig,
) -> dict[str, EmaRange]:
    """Per bank: each bit-width's mse range on ``act_init_samples`` rows, as the start of that
    bit-width's running min/max."""
    rows = sample_rows(len(data), config.act_init_samples, config.seed)
    with observing(units, max_samples=config.act_init_values) as observers:
        run_rows(unet, units, data, rows, config.batch_size)
    ema: dict[str, EmaRange] = {}
    for name, bank in activation_banks(units).items():
        if not observers[name].steps:
            continue  # never called (e.g. a branch the UNet does not take)
        sample = observers[name].sample(0).to(unet.device)  # the search is the costly part
        chosen = [q.search_range(sample, "mse") for q in bank.slots()]
        if chosen:
            ema[name] = EmaRange(config.act_momentum, torch.stack([lo.cpu() for lo, _ in chosen]),
                                 torch.stack([hi.cpu() for _, hi in chosen]))
    return ema


@torch.no_grad()
def calibrate_activations_ema(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet, config: QDiffusionConfig,
    progress: bool = True,
) -> None:
    """Q-Diffusion's activation calibration for every bit-width of every bank in one pass.

    1. mse init on ``act_init_samples`` rows: each bit-width's starting range; 2. a running
    min/max (EMA, ``act_momentum``) over all rows, shuffled, in passes of ``act_stat_batch`` rows
    that mix sampling steps (with per-step tables: passes of one step, in random order), updating
    every bit-width's range of a bank at once; 3. each bit-width's grid is its final range.
    (Passes in step order would end on the last steps' ranges and clip the others.)
    """
    banks = activation_banks(units)
    ema = _mse_init(unet, units, data, config)
    try:
        for name in ema:
            banks[name].observer = ema[name]
        per_step = any(bank.num_steps for bank in banks.values())
        run_rows(unet, units, data, torch.arange(len(data)), config.act_stat_batch,
                 shuffle_seed=config.seed, mix_steps=not per_step)
    finally:
        for bank in banks.values():
            bank.observer = None
    for name, observer in ema.items():
        for i, quantizer in enumerate(banks[name].slots()):
            quantizer.set_range(observer.low[i], observer.high[i])


def _tuned_banks(unit: QuantUnit) -> list[ActivationBank]:
    """The banks whose step sizes Δ are tuned, at the unit's default bits. The softmax bank is
    left out: Adam's step is absolute, and a 16-bit grid on [0, 1] has Δ ≈ 1.5e-5 — one step at
    lr 4e-4 would coarsen it to a few bits."""
    return [bank for bank in unit.dynamic_banks() if bank.slots()]


def tune_activation_steps(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet, config: QDiffusionConfig,
    progress: bool = True,
) -> None:
    """LSQ-style tuning of the activation step sizes Δ (at each unit's active bits), unit by unit:
    inputs from the quantized prefix, targets from the FP model, loss ``|y - ŷ|^p``."""
    recon = config.reconstruction
    rows = sample_rows(len(data), config.act_tune_samples, config.seed)
    order = execution_order(unet, units, data, recon.block_types)
    for index, (name, module) in enumerate(order):
        inner = [u for n, u in units.items() if n == name or n.startswith(name + ".")]
        banks = [bank for unit in inner for bank in _tuned_banks(unit)]
        if not banks:
            continue
        # the stacked step sizes of every option train; only the default option's get gradients
        scales = [bank.stack.scale for bank in banks]
        inputs = capture_unit(unet, units, module, data, rows, recon, want_output=False)
        with full_precision(units):
            targets = capture_unit(unet, units, module, data, rows, recon, True)
        try:
            for scale in scales:
                scale.requires_grad_(True)
            optimise_unit(module, scales, inputs, targets.to(inputs.device),
                          config.act_tune_iters, recon.batch_size, config.act_tune_lr,
                          config.seed + index, p=config.act_tune_p, cosine=True,
                          desc=f"Δ {name}", progress=progress)
        finally:
            for bank, scale in zip(banks, scales):
                scale.requires_grad_(False)
                scale.data.clamp_(min=1e-8)  # a step size must stay positive
                bank.stack.refresh()


def quantize_weights(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet, weight_range: str,
    reconstruction: ReconstructionConfig, out_dir: str | Path | None = None,
    progress: bool = True, on_unit_done: Callable[[str], None] | None = None,
) -> None:
    """Q-Diffusion's weights: a per-channel grid by ``weight_range`` (mse), then BRECQ/AdaRound
    reconstruction (checkpointed per unit in ``out_dir/reconstruction`` when given). DGQ's
    weights are these too."""
    calibrate_weights(units, weight_range)
    checkpoints = Path(out_dir) / CHECKPOINT_FOLDER if out_dir is not None else None
    reconstruct_weights(unet, units, data, reconstruction, checkpoints, progress, on_unit_done)


def quantize_qdiffusion(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    config: QDiffusionConfig | None = None, out_dir: str | Path | None = None,
    progress: bool = True, on_unit_done: Callable[[str], None] | None = None,
    weights_ready: bool = False,
) -> None:
    """Fill every quantizer of ``units`` (swapped into ``unet``) with Q-Diffusion's recipe.
    With ``out_dir`` the reconstruction writes a checkpoint per unit to
    ``out_dir/reconstruction`` and a rerun resumes after the last finished unit.
    ``weights_ready``: the weights are already quantized (e.g. loaded from an earlier run with
    ``pipeline.saving.load_quantized_weights``); only the activations are calibrated.

    >>> units = prepare_unet(pipe.unet, QuantConfig(wbits=4, abits=8))  # doctest: +SKIP
    >>> quantize_qdiffusion(pipe.unet, units, data, QDiffusionConfig(), "out/w4a8")  # doctest: +SKIP
    """
    config = config or QDiffusionConfig()
    if not weights_ready:
        quantize_weights(unet, units, data, config.weight_range, config.reconstruction, out_dir,
                         progress, on_unit_done)
    calibrate_activations_ema(unet, units, data, config, progress)
    if config.act_tune_iters:
        tune_activation_steps(unet, units, data, config, progress)
    freeze(unet)
    for unit in units.values():
        unit.refresh()
