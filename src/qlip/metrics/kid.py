"""Kernel Inception Distance (Bińkowski et al. 2018) on any extractor's features: the unbiased
MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / D + 1)³, from torchmetrics.

torchmetrics' ``KernelInceptionDistance`` averages the estimate over random subsets of 1,000
images (its default, needing ≥ 1,000 per set); here the unbiased estimate is taken on the whole
set at once (one subset of every image), which is what the subsets estimate, without their
randomness; ``kid_with_torchmetrics`` runs the torchmetrics metric itself (the tests check that
both agree). Intervals come from ``qlip.metrics.bootstrap.bootstrap_mmd`` on the same kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.kid import KernelInceptionDistance, maximum_mean_discrepancy, poly_kernel

from qlip.metrics.bootstrap import bootstrap_mmd


def _as_tensor(features) -> Tensor:
    values = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"features must be [N >= 2, D]; got shape {tuple(values.shape)}")
    return values


def kernel_matrices(features_a, features_b) -> tuple[Tensor, Tensor, Tensor]:
    """The polynomial kernels K_aa [n, n], K_ab [n, m], K_bb [m, m] (float64)."""
    a, b = _as_tensor(features_a), _as_tensor(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return poly_kernel(a, a), poly_kernel(a, b), poly_kernel(b, b)


def kid_from_features(features_a, features_b, paired: bool = False) -> float:
    """Unbiased KID (MMD², cubic kernel) between feature sets [n, D] and [m, D].

    ``paired=False`` (independent sets, n == m): torchmetrics' estimator, whose cross term
    averages every pair (i, j), i = j included. That is unbiased only when a_i and b_i are
    independent. ``paired=True`` (row i of both sets shows the same prompt and seed: a run against
    the FP run of the same seeds, or against renders of its own prompts): the U-statistic of
    Gretton et al. (2012), which drops the i = j pairs of the cross term too; it stays unbiased
    for the marginals when a_i and b_i are alike, where the estimator above reads far below
    zero (a paired copy gives exactly 0 here).

    Example:
        >>> kid_from_features(real_feats, gen_feats)  # ~0 for two draws of one distribution
    """
    k_aa, k_ab, k_bb = kernel_matrices(features_a, features_b)
    ones_a = torch.ones(1, len(k_aa), dtype=torch.float64)
    if paired:
        if len(k_aa) != len(k_bb):
            raise ValueError(f"paired sets need as many rows: {len(k_aa)} vs {len(k_bb)}")
        return float(bootstrap_mmd(k_aa, k_ab, k_bb, ones_a, paired=True)[0])
    if len(k_aa) != len(k_bb):  # torchmetrics' estimator assumes equal set sizes
        ones_b = torch.ones(1, len(k_bb), dtype=torch.float64)
        return float(bootstrap_mmd(k_aa, k_ab, k_bb, ones_a, ones_b)[0])
    return float(maximum_mean_discrepancy(k_aa, k_ab, k_bb))


class _Identity(torch.nn.Module):
    def forward(self, features: Tensor) -> Tensor:
        return features


def kid_with_torchmetrics(features_a, features_b, subsets: int = 1, subset_size: int | None = None
                          ) -> float:
    """torchmetrics' ``KernelInceptionDistance`` with a pass-through feature module: the
    papers' protocol (mean over random subsets). ``subset_size=None``: the whole set."""
    a, b = _as_tensor(features_a), _as_tensor(features_b)
    size = subset_size or min(len(a), len(b))
    metric = KernelInceptionDistance(feature=_Identity(), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute()[0])
