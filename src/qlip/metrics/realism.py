"""Realism score (Kynkäänniemi et al., "Improved precision and recall metric for assessing
generative models", NeurIPS 2019, Sec. 5): how far inside the real manifold one generated
image lies, from the k-NN radii of real features::

    R(φ_g) = max_r  ‖φ_r − NN_k(φ_r)‖₂ / ‖φ_g − φ_r‖₂

over the real features φ_r whose k-NN radius is among the smallest ``keep`` fraction (the paper
keeps half, dropping the largest hyperspheres that outliers span). R ≥ 1 means φ_g lies inside
some real sample's hypersphere. One of QLIP's label ablations (paper Table 4: "Realism score").
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

MIN_DISTANCE = 1e-12  # a generated feature equal to a real one: a finite, very high score


def _as_array(features: Tensor | np.ndarray) -> np.ndarray:
    values = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if values.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {values.shape}")
    return values.astype(np.float64)


class RealismScore:
    """Example:
    >>> realism = RealismScore(k=3).fit(real_features)   # [N, D]
    >>> scores = realism.score(generated_features)       # [M], higher is more realistic
    """

    def __init__(self, k: int = 3, keep: float = 0.5):
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1]; got {keep}")
        self.k, self.keep = k, keep
        self.centers: np.ndarray | None = None  # [N', D] real features kept
        self.radii: np.ndarray | None = None  # [N'] their k-NN radii

    def fit(self, real_features: Tensor | np.ndarray) -> RealismScore:
        """k-NN radii of real features [N, D] (N > k; each point's own distance 0 not counted)."""
        values = _as_array(real_features)
        if len(values) <= self.k:
            raise ValueError(f"need more than k={self.k} real features; got {len(values)}")
        distances, _ = NearestNeighbors(n_neighbors=self.k + 1).fit(values).kneighbors(values)
        radii = distances[:, self.k]  # column 0 is the point itself
        kept = np.argsort(radii, kind="stable")[: max(1, int(round(self.keep * len(radii))))]
        self.centers, self.radii = values[kept], radii[kept]
        return self

    def score(self, features: Tensor | np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """R per generated feature [M]."""
        if self.centers is None:
            raise RuntimeError("RealismScore is not fitted: call fit(real_features)")
        values = torch.from_numpy(_as_array(features))
        centers, radii = torch.from_numpy(self.centers), torch.from_numpy(self.radii)
        out = []
        for chunk in values.split(batch_size):
            distances = torch.cdist(chunk, centers).clamp_min(MIN_DISTANCE)  # [m, N']
            out.append((radii[None] / distances).amax(dim=1))
        return torch.cat(out).numpy()
