"""DGQ's grouping (Ryu et al., distribution-aware group quantization), as its public code does it:
per-index min and max of a layer input along each candidate dimension (channel, token), the
dimension with the larger spread, K-means (scikit-learn) on the (min, max) points into groups,
and one [min, max] range per group.

>>> observer = GroupRangeObserver(dims=(-1, -2))  # channel, token of a [B, N, C] input
>>> observer(torch.randn(4, 6, 5), step=0)
>>> stats = observer.stats(0)
>>> choice = choose_dimension(stats)  # index into stats.dims
>>> labels, low, high = kmeans_groups(stats.mins[choice], stats.maxs[choice], groups=2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GroupStats:
    """Per-index ranges of one input at one sampling step: for each candidate dim ``dims[i]``
    (a negative dim of the input), ``mins[i]``/``maxs[i]`` ``[size_i]`` (min of the per-batch
    mins, max of the per-batch maxes); ``low``/``high``: the whole tensor's range."""

    dims: tuple[int, ...]
    mins: list[torch.Tensor]
    maxs: list[torch.Tensor]
    low: torch.Tensor
    high: torch.Tensor

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(m.numel() for m in self.mins)


class GroupRangeObserver:
    """Bank observer: for every call, the per-index min and max along each candidate dim (all
    other dims reduced, batch included), folded into a running min of mins and max of maxes per
    sampling step. A candidate the input does not have (the token dim of a ``[B, C]`` input: it
    would be the batch dim) is dropped; ``dims=()`` keeps only the whole tensor's range."""

    def __init__(self, dims: tuple[int, ...] = ()):
        if any(d >= 0 for d in dims):
            raise ValueError(f"candidate dims are counted from the end (negative); got {dims}")
        self.dims = tuple(dims)
        self._stats: dict[int, GroupStats] = {}

    def __call__(self, x: torch.Tensor, step: int = 0) -> None:
        x = x.detach().float()
        dims = tuple(d for d in self.dims if -d < x.ndim)  # never the batch dim
        mins, maxs = [], []
        for d in dims:
            others = tuple(i for i in range(x.ndim) if i != x.ndim + d)
            mins.append(x.amin(dim=others))
            maxs.append(x.amax(dim=others))
        low, high = x.amin(), x.amax()
        seen = self._stats.get(step)
        if seen is None:
            self._stats[step] = GroupStats(dims, mins, maxs, low, high)
            return
        if seen.dims != dims or seen.sizes != tuple(m.numel() for m in mins):
            raise ValueError(
                f"a layer input changed shape during calibration (sizes {seen.sizes} along dims "
                f"{seen.dims}, now {tuple(m.numel() for m in mins)}): DGQ's groups need one "
                "resolution and one prompt length; calibrate at a single height/width")
        seen.mins = [torch.minimum(a, b) for a, b in zip(seen.mins, mins)]
        seen.maxs = [torch.maximum(a, b) for a, b in zip(seen.maxs, maxs)]
        seen.low, seen.high = torch.minimum(seen.low, low), torch.maximum(seen.high, high)

    @property
    def steps(self) -> list[int]:
        return sorted(self._stats)

    def stats(self, step: int = 0) -> GroupStats:
        return self._stats[step]


def spread(mins: torch.Tensor, maxs: torch.Tensor) -> float:
    """DGQ's spread of a dimension: ``(max(maxes) − min(maxes)) + (max(mins) − min(mins))``."""
    return float((maxs.max() - maxs.min()) + (mins.max() - mins.min()))


def choose_dimension(stats: GroupStats) -> int:
    """The candidate (index into ``stats.dims``) with the larger spread; a tie goes to the first
    (the channel dim)."""
    if not stats.dims:
        raise ValueError("no candidate dimension to group along (a per-tensor input)")
    spreads = [spread(lo, hi) for lo, hi in zip(stats.mins, stats.maxs)]
    return int(np.argmax(spreads))  # argmax keeps the first of equal values


def kmeans_groups(
    mins: torch.Tensor, maxs: torch.Tensor, groups: int, seed: int = 0, n_init: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-means (scikit-learn) of the points ``(min_i, max_i)`` into at most ``groups`` clusters.

    Returns ``labels [S]`` (long, the group of each index) and each group's range ``low, high``
    ``[groups]``: the min of its members' mins and the max of its members' maxes. When there are
    fewer distinct points than ``groups``, each distinct point is its own group and the groups
    left over get the range [0, 1] (no index uses them).
    """
    from sklearn.cluster import KMeans

    if groups < 1:
        raise ValueError(f"groups must be at least 1; got {groups}")
    points = torch.stack([mins.float(), maxs.float()], dim=1).cpu().double().numpy()  # [S, 2]
    distinct = len(np.unique(points, axis=0))
    clusters = min(groups, distinct)
    if clusters == 1:
        labels = np.zeros(len(points), dtype=np.int64)
    else:
        labels = KMeans(n_clusters=clusters, n_init=n_init, random_state=seed).fit(points).labels_
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    low = torch.zeros(groups, dtype=torch.float64)
    high = torch.ones(groups, dtype=torch.float64)
    pts = torch.as_tensor(points)
    low[:clusters] = torch.full((clusters,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, labels_t, pts[:, 0], "amin")
    high[:clusters] = torch.full((clusters,), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, labels_t, pts[:, 1], "amax")
    empty = torch.isinf(low) | torch.isinf(high)  # a cluster left without members
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 1.0)
    return labels_t, low.float(), high.float()
