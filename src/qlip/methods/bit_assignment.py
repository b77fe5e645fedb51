"""The best fixed per-layer bit assignment at a target FAB (issue 12's third control): one
bit-width per dynamic unit, the same at every step and for every prompt.

1. **Damage** (:func:`unit_damage`): ``D[u, k]`` = mean ``(ε_fp − ε_q)²`` over rows (FP
   trajectories) with every dynamic unit at the highest option except unit ``u`` at option
   ``k`` (``D[u, K−1]`` is the all-high baseline, the same for every unit).
2. **Greedy** (:func:`greedy_assignment`): start with every unit at the highest option; while the
   weighted mean bits exceed the target, lower by one option the unit whose marginal damage
   ``max(D[u, l−1] − D[u, l], 0)`` per bit saved ``w_u (b_l − b_{l−1})`` is least. The measure
   is the ledger's: FAB (every quantized Linear/Conv layer weighs 1, fixed layers at their own
   bits, attention outside it) or the MAC-weighted bits. The last move is kept only if it lands
   closer to the target than the step before it.

The assignment is a JSON file (:func:`save_assignment`) with what made it: options, target and
reached measure, the damage table, the order of the moves, the quantized model's state digest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import CorruptFileError, check_format, read_json_dict, write_atomic
from ..nn import QuantUnit
from .calib_data import CalibrationSet
from .qlip.sensitivity import row_errors
from .qlip.train import fp_targets

FORMAT = "qlip-bit-assignment"
VERSION = 1
REMEDY = "compute it again with `qlip per-layer`"


@torch.no_grad()
def unit_damage(
    unet: nn.Module, units: dict[str, QuantUnit], rows: CalibrationSet, names: Sequence[str],
    options: tuple[int, ...], batch_size: int = 16, progress: bool = True,
) -> torch.Tensor:
    """``[len(names), K]`` mean squared error against the FP prediction over ``rows`` with every
    dynamic unit at ``options[-1]`` except unit ``names[j]`` at ``options[k]``.

    >>> units = quant_units(pipe.unet)  # doctest: +SKIP
    >>> damage = unit_damage(pipe.unet, units, rows, layers, (4, 5, 6))  # doctest: +SKIP
    """
    dynamic = {n: u for n, u in units.items() if u.dynamic}
    lacking = [n for n in dynamic if not set(options) <= set(dynamic[n].options)]
    if lacking:
        raise ValueError(f"{len(lacking)} dynamic units (e.g. {lacking[0]}) have no quantizer for "
                         f"some of {list(options)}: quantize with --abits-options covering them")
    targets = fp_targets(unet, rows, units, batch_size)
    top = options[-1]
    out = torch.full((len(names), len(options)), float("nan"), dtype=torch.float64)
    bar = tqdm(total=1 + len(names) * (len(options) - 1), desc="per-unit damage",
               disable=not progress)
    try:
        for unit in dynamic.values():
            unit.set_bits(top)
        out[:, -1] = row_errors(unet, units, rows, targets, batch_size).double().mean()
        bar.update(1)
        for j, name in enumerate(names):
            for k, bits in enumerate(options[:-1]):
                dynamic[name].set_bits(bits)
                out[j, k] = row_errors(unet, units, rows, targets, batch_size).double().mean()
                bar.update(1)
            dynamic[name].set_bits(top)
    finally:
        bar.close()
        for unit in dynamic.values():
            unit.set_bits(unit.default_bits)
    return out


@dataclass
class Budget:
    """The weighted mean bits the target is on: ``(fixed + Σ_u w_u b_u) / total``. ``weights``
    per greedy unit (0: outside the measure, never lowered), ``fixed``: Σ weight·bits of the
    units the greedy does not set, ``total``: every weight."""

    weights: list[float]
    fixed: float
    total: float

    def measure(self, bits: Sequence[int]) -> float:
        return (self.fixed + sum(w * b for w, b in zip(self.weights, bits))) / self.total

    def span(self, options: tuple[int, ...]) -> tuple[float, float]:
        """(lowest, highest) reachable: every unit at the lowest / the highest option."""
        n = len(self.weights)
        return self.measure([options[0]] * n), self.measure([options[-1]] * n)


@dataclass
class GreedyResult:
    levels: list[int]  # option index per unit
    bits: list[int]
    measure: float
    moves: list[dict] = field(default_factory=list)  # unit, from, to, cost per bit, measure after


def check_target(target: float, budget: Budget, options: tuple[int, ...]) -> None:
    low, high = budget.span(options)
    if not low - 1e-9 <= target <= high + 1e-9:
        raise ValueError(f"target FAB {target:g} is outside what options {list(options)} reach on "
                         f"this model ({low:.3f} with every unit at {options[0]} bits to "
                         f"{high:.3f} at {options[-1]}): choose a target in that range")


def greedy_assignment(damage: torch.Tensor, options: tuple[int, ...], budget: Budget,
                      target: float, names: Sequence[str] | None = None) -> GreedyResult:
    """Lower the least damaging unit per bit saved, one option at a time, until the budget's
    measure reaches ``target`` (see the module's docstring).

    >>> greedy_assignment(torch.tensor([[9., 0.], [1., 0.]]), (4, 8), Budget([1, 1], 0, 2), 6).bits
    [8, 4]
    """
    check_target(target, budget, options)
    count, top = damage.shape[0], len(options) - 1
    names = list(names) if names is not None else [str(j) for j in range(count)]
    levels = [top] * count
    bits = lambda: [options[level] for level in levels]  # noqa: E731
    measure, moves = budget.measure(bits()), []
    while measure > target + 1e-12:
        best = None
        for j in range(count):
            level, weight = levels[j], budget.weights[j]
            if level == 0 or weight <= 0:
                continue
            cost = max(float(damage[j, level - 1] - damage[j, level]), 0.0)
            ratio = cost / (weight * (options[level] - options[level - 1]))
            if best is None or ratio < best[0]:
                best = (ratio, j)
        if best is None:
            break  # every unit at its lowest: check_target makes this unreachable
        ratio, j = best
        levels[j] -= 1
        before, measure = measure, budget.measure(bits())
        moves.append({"unit": names[j], "from": options[levels[j] + 1], "to": options[levels[j]],
                      "damage_per_bit": ratio, "measure": measure})
        if measure < target and target - measure > before - target:  # the step before was closer
            levels[j] += 1
            moves.pop()
            measure = before
            break
    return GreedyResult(levels, bits(), measure, moves)


def save_assignment(path: str | Path, bits: dict[str, int], record: dict) -> Path:
    """Write the assignment (unit → bits) and ``record`` (what made it) as JSON, atomically."""
    path = Path(path)
    document = {"format": FORMAT, "version": VERSION, "bits": dict(bits), **record}
    write_atomic(path, json.dumps(document, indent=1))
    return path


def load_assignment(path: str | Path) -> dict:
    """The document :func:`save_assignment` wrote, checked (format, version, ``bits``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--assignment {path}: no such file; compute one with "
                                "`qlip per-layer --quantized DIR --target-fab F --out FILE`")
    document = read_json_dict(path, REMEDY)
    check_format(document, path, FORMAT, VERSION, REMEDY)
    bits = document.get("bits")
    if not isinstance(bits, dict) or not bits or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in bits.values()):
        raise CorruptFileError(f"{path} holds no unit → bits table ('bits'); {REMEDY}")
    return document
