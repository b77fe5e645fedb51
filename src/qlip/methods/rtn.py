"""Round-to-nearest (RTN): weights on a per-channel grid from their range, activations from the
ranges observed on calibration data; no optimisation. The first, simplest method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import QuantUnit
from .calib_data import CalibrationSet, run_calibration
from .calibrate import activation_banks, calibrate_bank, calibrate_weights, observing


@dataclass(frozen=True)
class RTNConfig:
    weight_range: str = "minmax"  # minmax | mse | percentile
    act_range: str = "minmax"  # minmax | mse | percentile
    act_samples: int = 262_144  # values kept per activation for mse/percentile search
    batch_size: int = 8


def calibrate_activations(
    unet: nn.Module,
    units: dict[str, QuantUnit],
    data: CalibrationSet,
    method: str = "minmax",
    samples: int = 262_144,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Observe every activation bank on ``data`` (FP pass) and set each bank's grids, per step when
    its quantizers hold step tables."""
    banks = activation_banks(units)
    per_step = any(bank.num_steps for bank in banks.values())
    keep = 0 if method == "minmax" else samples
    with observing(units, max_samples=keep, per_step=per_step) as observers:
        run_calibration(unet, data, units, batch_size, progress)
    for name, bank in banks.items():
        if observers[name].steps:
            calibrate_bank(bank, observers[name], method)


def quantize_rtn(
    unet: nn.Module,
    units: dict[str, QuantUnit],
    data: CalibrationSet,
    config: RTNConfig | None = None,
    progress: bool = True,
) -> None:
    """Fill every quantizer of ``units`` (already swapped into ``unet``) by round-to-nearest."""
    config = config or RTNConfig()
    calibrate_weights(units, config.weight_range)
    calibrate_activations(
        unet, units, data, config.act_range, config.act_samples, config.batch_size, progress
    )
