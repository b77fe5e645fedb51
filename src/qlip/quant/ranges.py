"""Range (clipping) search for uniform quantizers: min-max, Q-Diffusion's mse search, percentile.

Every function returns ``(xmin, xmax)`` reduced over all dims except ``keep_dim`` (per tensor when
``keep_dim`` is None), so the same code serves per-tensor activations and per-channel weights.
"""

from __future__ import annotations

import torch

from .rounding import round_ste


def _flatten_keep(x: torch.Tensor, keep_dim: int | None) -> torch.Tensor:
    # returns [K, M]: one row per kept channel (K = 1 for per-tensor)
    if keep_dim is None:
        return x.reshape(1, -1)
    return x.transpose(0, keep_dim).reshape(x.shape[keep_dim], -1)


def minmax_range(x: torch.Tensor, keep_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _flatten_keep(x.detach().float(), keep_dim)
    return rows.amin(dim=1), rows.amax(dim=1)


def percentile_range(
    x: torch.Tensor, keep_dim: int | None = None, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip at the ``percentile`` (and ``100 - percentile``) of each row."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100]; got {percentile}")
    rows = _flatten_keep(x.detach().float(), keep_dim)
    if rows.shape[1] > 2_000_000:  # torch.quantile has an input-size limit; subsample evenly
        rows = rows[:, :: rows.shape[1] // 2_000_000 + 1]
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=rows.device)
    lo_hi = torch.quantile(rows, q, dim=1)
    return lo_hi[0], lo_hi[1]


def affine_params(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, include_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of a ``bits``-bit grid covering [xmin, xmax]. ``include_zero``: the
    range is widened to hold 0 (so 0 is exactly representable); without it the grid spans exactly
    [xmin, xmax] (DGQ's per-group ranges), and the zero point may lie outside [0, 2^b - 1]."""
    levels = 2**bits - 1
    if include_zero:
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        absmax = torch.maximum(xmax, -xmin)
        scale = (2 * absmax / levels).clamp_min(1e-8)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((xmax - xmin) / levels).clamp_min(1e-8)
        zero = torch.round(-xmin / scale)
    return scale, zero


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, ste: bool = False
) -> torch.Tensor:
    """``(clamp(round(x/Δ) + z, 0, 2^b - 1) - z)·Δ``; ``scale``/``zero`` broadcast against ``x``."""
    q = x / scale
    q = round_ste(q) if ste else torch.round(q)
    q = torch.clamp(q + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def mse_range(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    keep_dim: int | None = None,
    p: float = 2.4,
    steps: int = 80,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Diffusion's search: shrink min and max by ``1 - 0.01·i`` for i < ``steps``, keep the best
    ``mean(|x - x̂|^p)`` per row. All candidates are evaluated together (no Python loop over channels).
    """
    rows = _flatten_keep(x.detach().float(), keep_dim)  # [K, M]
    if rows.shape[1] > 262_144:  # the error estimate needs no more samples than this
        rows = rows[:, :: rows.shape[1] // 262_144 + 1]
    xmin, xmax = rows.amin(dim=1), rows.amax(dim=1)
    best_err = torch.full_like(xmin, float("inf"))
    best_min, best_max = xmin.clone(), xmax.clone()
    chunk = max(1, min(steps, 2**27 // max(rows.numel(), 1)))
    for start in range(0, steps, chunk):
        shrink = 1.0 - 0.01 * torch.arange(start, min(start + chunk, steps), device=rows.device)
        cand_min = xmin[None, :] * shrink[:, None]  # [S, K]
        cand_max = xmax[None, :] * shrink[:, None]
        scale, zero = affine_params(cand_min, cand_max, bits, symmetric)
        xq = fake_quant(rows[None], scale[..., None], zero[..., None], bits)  # [S, K, M]
        err = (rows[None] - xq).abs().pow(p).mean(dim=2)  # [S, K]
        err_min, idx = err.min(dim=0)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        pick = idx[None]
        best_min = torch.where(better, cand_min.gather(0, pick)[0], best_min)
        best_max = torch.where(better, cand_max.gather(0, pick)[0], best_max)
    return best_min, best_max


RANGE_METHODS = ("minmax", "mse", "percentile")


def search_range(
    x: torch.Tensor, method: str, bits: int, symmetric: bool = False,
    channel_dim: int | None = None, group_index: torch.Tensor | None = None,
    num_groups: int = 1, percentile: float = 99.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The [xmin, xmax] that ``method`` picks for a ``bits``-bit grid on ``x``: one pair per tensor
    (``channel_dim`` None), per channel, or per group (``group_index`` [C] -> group id)."""
    if method not in RANGE_METHODS:
        raise ValueError(f"range method must be one of {RANGE_METHODS}; got {method!r}")
    dim = channel_dim % x.ndim if channel_dim is not None else None
    if method == "minmax":
        xmin, xmax = minmax_range(x, dim)
    elif method == "mse":
        xmin, xmax = mse_range(x, bits, symmetric, dim)
    else:
        xmin, xmax = percentile_range(x, dim, percentile)
    if group_index is None:
        return xmin, xmax
    # per-channel ranges -> per-group ranges
    idx = group_index.to(xmin.device)
    gmin = torch.full((num_groups,), float("inf"), device=xmin.device)
    gmax = torch.full((num_groups,), float("-inf"), device=xmin.device)
    return gmin.scatter_reduce(0, idx, xmin, "amin"), gmax.scatter_reduce(0, idx, xmax, "amax")
