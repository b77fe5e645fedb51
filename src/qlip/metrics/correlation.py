"""Rank and linear correlation between two score lists (e.g. GIQA vs human/alignment scores)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats


def _as_pair(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray):
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-D score lists of equal length >= 2; got {x.shape}, {y.shape}")
    return x, y


def srocc(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank-order correlation coefficient (ties get average ranks).

    Example:
        >>> srocc([1, 2, 3], [10, 30, 20])
        0.5
    """
    return float(scipy.stats.spearmanr(*_as_pair(a, b)).statistic)


def plcc(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson linear correlation coefficient."""
    return float(scipy.stats.pearsonr(*_as_pair(a, b)).statistic)
