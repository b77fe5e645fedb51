"""A prompt's own quantization sensitivity: ``mean((ε_fp − ε_q)²)`` with every dynamic unit at one
bit-width (QLIP's lowest option), on the rows of the prompt's FP trajectory (every step, both
guidance halves). A T2Q label the paper does not have: it measures directly how much the prompt
loses to low activation bits, where GIQA measures how good its FP image is."""

from __future__ import annotations

import torch
from torch import nn

from ...nn import QuantUnit
from ..calib_data import CalibrationSet
from ..unet_inputs import call_unet
from .train import fp_targets


@torch.no_grad()
def row_sensitivity(
    unet: nn.Module, units: dict[str, QuantUnit], rows: CalibrationSet, bits: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """``[N]`` mean squared difference between the FP prediction and the prediction with every
    dynamic unit at ``bits`` (fixed units at their own bits), per row.

    >>> err = row_sensitivity(pipe.unet, quant_units(pipe.unet), rows, bits=4)  # doctest: +SKIP
    """
    dynamic = [u for u in units.values() if u.dynamic]
    lacking = [name for name, u in units.items() if u.dynamic and bits not in u.options]
    if lacking:
        raise ValueError(f"{len(lacking)} dynamic units (e.g. {lacking[0]}) have no quantizer for "
                         f"{bits} bits: quantize with --abits-options including {bits}")
    targets = fp_targets(unet, rows, units, batch_size)
    try:
        for unit in dynamic:
            unit.set_bits(bits)
        return row_errors(unet, units, rows, targets, batch_size)
    finally:
        for unit in dynamic:
            unit.set_bits(unit.default_bits)


@torch.no_grad()
def row_errors(unet: nn.Module, units: dict[str, QuantUnit], rows: CalibrationSet,
               targets: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[N]`` mean squared difference between ``targets`` (e.g. the FP predictions,
    :func:`~qlip.methods.qlip.train.fp_targets`) and the UNet's prediction with every unit at
    the bits it is set to, per row."""
    out = torch.empty(len(rows))
    for step, index in _rows_by_step(rows):
        for unit in units.values():
            unit.set_step(step)
        for start in range(0, len(index), batch_size):
            sel = index[start : start + batch_size]
            eps = call_unet(unet, rows.subset(sel).inputs()).float().cpu()
            out[sel] = (eps - targets[sel]).pow(2).flatten(1).mean(1)
    return out


def _rows_by_step(rows: CalibrationSet):
    for step in torch.unique(rows.steps).tolist():
        yield step, torch.nonzero(rows.steps == step).flatten()


def per_prompt_mean(values: torch.Tensor, prompt_of_row: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` mean of the row ``values [N]`` of each prompt (``prompt_of_row [N]`` in
    ``0..count-1``); every prompt must have rows."""
    index = prompt_of_row.long()
    rows = torch.bincount(index, minlength=count)
    if len(rows) > count or (rows == 0).any():
        raise ValueError(f"every prompt 0..{count - 1} needs rows and no other index may occur")
    total = torch.zeros(count, dtype=torch.float64).index_add_(0, index, values.double())
    return (total / rows).float()
