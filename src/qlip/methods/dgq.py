"""DGQ (Ryu, Park, Shim): distribution-aware group quantization of activations, as its public code
implements it (ALGORITHMS.md), with its bugs fixed.

- **Weights**: Q-Diffusion's recipe (per-channel mse grid, BRECQ/AdaRound reconstruction), the
  same code (``qdiffusion.quantize_weights``).
- **Activations**, per sampling step (tables keyed by the step *index*): the FP-activation pass
  over the calibration rows records, for every layer input, the per-index min and max along each
  candidate dimension (Linear: channel, token; Conv2d, run as unfold + matmul: unfolded channel,
  position; q/k/v: head-dim channel, token); the dimension with the larger spread is chosen, its
  (min, max) points are clustered by K-means into ``act_groups`` groups, and each group gets the
  grid of its own [min, max]. With ``act_groups = 1`` every input is per tensor (the baseline).
- **Attention**: log2 probabilities with a dynamic scale, the start token kept (engine options,
  ``QuantConfig(softmax_quantizer="log2", keep_start_token=True, softmax_follows_abits=True)``).

One calibration fills every bit-width of a bank: the groups and ranges do not depend on the bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import ActivationBank, QuantUnit
from ..quant import GroupRangeObserver, GroupStats, choose_dimension, kmeans_groups
from .brecq import ReconstructionConfig
from .calib_data import CalibrationSet, run_calibration
from .calibrate import activation_banks, freeze
from .qdiffusion import quantize_weights


@dataclass(frozen=True)
class DGQConfig:
    """DGQ's hyper-parameters beyond the layer config (``QuantConfig.act_groups`` is g)."""

    weight_range: str = "mse"  # the weights' grid before AdaRound (Q-Diffusion's recipe)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    kmeans_n_init: int = 1  # K-means restarts (scikit-learn's n_init)
    batch_size: int = 64  # rows per UNet pass while observing (rows of one sampling step)
    seed: int = 0  # K-means' random_state

    def __post_init__(self):
        if isinstance(self.reconstruction, dict):  # from a saved method config
            object.__setattr__(self, "reconstruction", ReconstructionConfig(**self.reconstruction))
        if self.kmeans_n_init < 1 or self.batch_size < 1:
            raise ValueError(f"kmeans_n_init and batch_size must be >= 1; got "
                             f"{self.kmeans_n_init}, {self.batch_size}")


def table_steps(data: CalibrationSet) -> int:
    """How many per-step rows ``data`` calibrates: its step indices must be 0..T-1, every one."""
    steps = sorted(torch.unique(data.steps).tolist())
    missing = sorted(set(range(steps[-1] + 1)) - set(steps))
    if missing:
        raise ValueError(
            f"DGQ calibrates one table row per sampling step, but the calibration data lacks "
            f"steps {missing[:5]}{'...' if len(missing) > 5 else ''}: keep every step "
            "(--calib-kept-steps at least --calib-steps)")
    return steps[-1] + 1


def check_tables(units: dict[str, QuantUnit], steps: int) -> None:
    """Every unit must hold per-step tables of ``steps`` rows (before any work is done)."""
    for name, unit in units.items():
        rows = unit.step_rows()
        if rows != steps:
            raise ValueError(
                f"{name}: DGQ needs per-step activation tables of {steps} rows (the calibration "
                f"data's sampling steps), this unit has {rows}; prepare the UNet with "
                f"QuantConfig(act_steps={steps})")


def _merged(observer: GroupRangeObserver) -> GroupStats:
    """One range over every step (for a bank without step rows)."""
    every = [observer.stats(s) for s in observer.steps]
    low = torch.stack([s.low for s in every]).amin()
    high = torch.stack([s.high for s in every]).amax()
    return GroupStats((), [], [], low, high)


def _set_grouped(bank: ActivationBank, stats: GroupStats, row: int | None,
                 config: DGQConfig) -> None:
    if not stats.dims:
        raise ValueError(f"an input of a grouped bank has none of the candidate dims "
                         f"{bank.dims}; leave that layer per tensor with a LayerRule")
    pick = choose_dimension(stats)
    labels, low, high = kmeans_groups(stats.mins[pick], stats.maxs[pick], bank.stack.groups,
                                      config.seed, config.kmeans_n_init)
    size = dict(zip(stats.dims, stats.sizes))
    bank.stack.set_groups(row, [size.get(d, 0) for d in bank.dims],
                          bank.dims.index(stats.dims[pick]), labels, low, high, refresh=False)


def calibrate_bank_dgq(bank: ActivationBank, observer: GroupRangeObserver,
                       config: DGQConfig | None = None) -> None:
    """Set every option of ``bank`` from what ``observer`` saw: per step row, a grouped bank by
    the spread rule and K-means, a uniform bank by its min and max (a bank without step rows:
    over every step). Call ``refresh()`` on the bank's stack (or unit) afterwards."""
    config = config or DGQConfig()
    if bank.kind == "log2":
        return  # dynamic scale: nothing to calibrate
    if not bank.num_steps:
        for quantizer in bank.slots():
            stats = _merged(observer)
            quantizer.set_range(stats.low.reshape(1), stats.high.reshape(1))
        return
    for step in observer.steps:
        stats = observer.stats(step)
        if bank.kind == "grouped":
            _set_grouped(bank, stats, step, config)
        else:
            for quantizer in bank.slots():
                quantizer.set_range(stats.low.reshape(1), stats.high.reshape(1), step=step)


@torch.no_grad()
def calibrate_activations_dgq(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    config: DGQConfig | None = None, progress: bool = True,
) -> None:
    """Observe every bank on ``data`` (FP activations, one step per pass), then set each step
    row: grouped banks by the spread rule and K-means, per-tensor banks by their min and max
    (log2 banks scale dynamically and need nothing)."""
    config = config or DGQConfig()
    banks = activation_banks(units)
    observers = {name: GroupRangeObserver(bank.dims) for name, bank in banks.items()}
    try:
        for name, bank in banks.items():
            bank.observer = observers[name]
        run_calibration(unet, data, units, config.batch_size, progress)
    finally:
        for bank in banks.values():
            bank.observer = None
    for name, bank in tqdm(banks.items(), desc="DGQ groups", disable=not progress):
        if observers[name].steps:
            calibrate_bank_dgq(bank, observers[name], config)
    for unit in units.values():
        unit.refresh()


def quantize_dgq(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    config: DGQConfig | None = None, out_dir: str | Path | None = None, progress: bool = True,
    on_unit_done: Callable[[str], None] | None = None, weights_ready: bool = False,
) -> None:
    """Fill every quantizer of ``units`` (prepared with ``QuantConfig(act_steps=T, act_groups=g,
    preset="dgq", ...)``, T = the data's sampling steps) with DGQ. ``out_dir``: the weight
    reconstruction's checkpoints (resumable); ``weights_ready``: weights already loaded.

    >>> steps = table_steps(data)  # doctest: +SKIP
    >>> units = prepare_unet(unet, QuantConfig(wbits=4, abits=6, act_groups=8, act_steps=steps,
    ...     preset="dgq", softmax_quantizer="log2", keep_start_token=True))  # doctest: +SKIP
    >>> quantize_dgq(unet, units, data, DGQConfig(), "out/dgq-w4a6")  # doctest: +SKIP
    """
    config = config or DGQConfig()
    check_tables(units, table_steps(data))
    if not weights_ready:
        quantize_weights(unet, units, data, config.weight_range, config.reconstruction, out_dir,
                         progress, on_unit_done)
    calibrate_activations_dgq(unet, units, data, config, progress)
    freeze(unet)
