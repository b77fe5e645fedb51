"""FAB of requested bits, and the FAB Q2B's learned map gives a prompt of each predicted quality:
how far the prompt can move the bits. Light (no plotting): ``qlip train-qlip`` records the map at
the labels' range in every ``qlip.json``, and ``qlip plot-qlip`` draws it."""

from __future__ import annotations

import numpy as np
import torch

from ..methods.qlip import Q2B
from ..nn import QuantUnit, fp_bits

# the predicted qualities train-qlip records Q2B's FAB at: T2Q's labels are percentiles in [0, 1]
REACH_QUALITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def fab(bits: np.ndarray, units: dict[str, QuantUnit], dynamic: list[str]) -> np.ndarray:
    """``[N]`` FAB of ``bits [N, S, U]`` over the FAB layers (fixed layers at their own bits)."""
    column = {name: j for j, name in enumerate(dynamic)}
    layers = [n for n, u in units.items() if u.fab_member]
    per_layer = [fp_bits(bits[:, :, column[n]]).mean(1) if n in column else
                 np.full(len(bits), float(fp_bits(units[n].default_bits))) for n in layers]
    return np.mean(per_layer, axis=0)


def q2b_fab(q2b: Q2B, units: dict[str, QuantUnit], dynamic: list[str],
            qualities: np.ndarray) -> np.ndarray:
    """``[Q]`` the FAB ``q2b`` gives a prompt of each predicted quality (its argmax bits at every
    step), whatever the prompt: Q2B's learned map. ``dynamic``: Q2B's units, in its order."""
    q = torch.as_tensor(np.asarray(qualities), dtype=torch.float32, device=q2b.bit_values.device)
    with torch.no_grad():
        bits = q2b.bits(q, torch.arange(q2b.num_steps, device=q.device))  # [S, Q, U]
    return fab(bits.permute(1, 0, 2).cpu().numpy(), units, dynamic)


def reach(q2b: Q2B, units: dict[str, QuantUnit], dynamic: list[str]) -> dict:
    """Q2B's FAB at the predicted qualities :data:`REACH_QUALITIES`, and its span (largest minus
    smallest): the most a prompt can move the bits. 0 for the timestep-only Q2B."""
    values = q2b_fab(q2b, units, dynamic, np.array(REACH_QUALITIES))
    return {"fab_at_quality": {f"{q:g}": float(v) for q, v in zip(REACH_QUALITIES, values)},
            "fab_span": float(values.max() - values.min())}
