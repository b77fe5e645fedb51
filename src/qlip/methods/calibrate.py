"""Activation calibration: attach observers to every activation bank, run data, set the grids of
every bit-width in each bank from what was observed, remove the observers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..nn import ActivationBank, QuantUnit
from ..quant import RangeObserver


def activation_banks(units: dict[str, QuantUnit]) -> dict[str, ActivationBank]:
    """Every activation bank of the units, named ``<unit>.<input>`` (e.g. ``...to_q.in0``, ``...attn1.processor.probs``)."""
    return {f"{name}.{part}": bank for name, unit in units.items()
            for part, bank in unit.activation_banks().items()}


@contextmanager
def observing(
    units: dict[str, QuantUnit], max_samples: int = 0, per_step: bool = False
) -> Iterator[dict[str, RangeObserver]]:
    """While inside, every activation bank records its inputs and passes them through unquantized
    (the FP model runs); the observers are removed on exit, whatever happens.

    >>> with observing(units) as observers:   # doctest: +SKIP
    ...     run_calibration_data(unet, calib)
    """
    banks = activation_banks(units)
    observers = {name: RangeObserver(max_samples, per_step) for name in banks}
    try:
        for name, bank in banks.items():
            bank.observer = observers[name]
        yield observers
    finally:
        for bank in banks.values():
            bank.observer = None


def calibrate_bank(bank: ActivationBank, observer: RangeObserver, method: str = "minmax") -> None:
    """Set the grid of every bit-width quantizer in ``bank`` from ``observer`` (per step if the
    quantizers hold step tables and the observer was per step)."""
    for quantizer in bank.slots():  # log2 banks have none: they scale dynamically
        for step in observer.steps:
            row = step if quantizer.num_steps else None
            if method == "minmax":
                quantizer.set_range(*observer.range(step), step=row)
            else:
                quantizer.calibrate(observer.sample(step), method, step=row)


def calibrate_weights(units: dict[str, QuantUnit], method: str = "minmax") -> None:
    for unit in units.values():
        unit.calibrate_weight(method)


def freeze(model: nn.Module) -> None:
    """No gradients anywhere: quantized weights are then computed once and cached."""
    model.requires_grad_(False)
