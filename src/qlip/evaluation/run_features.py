"""Per-image features and scores of an evaluation, in one compact safetensors file next to
``metrics.json``: every metric, its interval and any paired comparison can be recomputed from it
without the images.

``features.safetensors`` holds, for N images (float16 features, float32 scores):

- ``generated.<space>`` / ``real.<space>`` [N, D]: the extractor's feature spaces (``global``:
  FID, KID, GIQA; ``spatial``: sFID; ``fidelity``: the damage-sensitive features, when the
  extractor has them), for the generated images and the real images of the same prompts;
- ``score.<name>`` [N]: per-image scores (clip_score, alignment, giqa, giqa_knn, and against a
  reference run: image_mse_vs_reference, psnr_vs_reference, perceptual_vs_reference);
- ``group.<name>`` [N] int: richness level, objects in the scene (-1 = unknown);
- metadata: ``pairs`` (a SHA-256 over the (prompt, seed) list, to refuse unpaired comparisons),
  ``num_images``, ``label``, ``reference_run``, and ``reference.<space>`` keys in the file when
  the reference run's generated features were measured (FID/KID to the reference: global and
  fidelity spaces only, no metric reads the reference's spatial features).

Reference world, 2,000 images, 256 + 512 + 192 dimensions: 3.8 MB per set, 9.5 MB with the
reference (7.7 MB without).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import load_tensors, save_tensors

FEATURES_FILE = "features.safetensors"
SETS = ("generated", "real", "reference")


def pairs_digest(prompts: Sequence[str], seeds: Sequence[int]) -> str:
    """SHA-256 of the (prompt, seed) list: two runs compare image by image only if equal."""
    text = json.dumps([[p, int(s)] for p, s in zip(prompts, seeds)])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class RunFeatures:
    """What a run's metrics are computed from (see the module doc for the keys)."""

    features: dict[str, dict[str, np.ndarray]]  # set -> space -> [N, D]
    scores: dict[str, np.ndarray]  # name -> [N]
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] int
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(next(iter(self.features["generated"].values())))

    @property
    def real_paired(self) -> bool:
        """Real image i shows prompt i (reference world: renders of the prompts' scenes)?
        Otherwise the real set is resampled on its own and kept whole in subsets."""
        return self.meta.get("real_paired") == "1"

    def _sliced(self, name: str) -> bool:
        return name != "real" or self.real_paired

    def subset(self, index: np.ndarray) -> RunFeatures:
        """The same run restricted to images ``index`` (e.g. one richness level)."""
        return RunFeatures(
            {s: {k: v[index] if self._sliced(s) else v for k, v in spaces.items()}
             for s, spaces in self.features.items()},
            {k: v[index] for k, v in self.scores.items()},
            {k: v[index] for k, v in self.groups.items()}, dict(self.meta))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/features.safetensors``; features rounded to float16 (what the metrics
        are then computed from: :func:`load_run_features` gives the same numbers back)."""
        tensors = {f"{s}.{k}": np.ascontiguousarray(v, dtype=np.float16)
                   for s, spaces in self.features.items() for k, v in spaces.items()}
        tensors |= {f"score.{k}": np.asarray(v, dtype=np.float32) for k, v in self.scores.items()}
        tensors |= {f"group.{k}": np.asarray(v, dtype=np.int32) for k, v in self.groups.items()}
        path = Path(folder) / FEATURES_FILE
        save_tensors(tensors, path, metadata={k: str(v) for k, v in self.meta.items()})
        return path

    def rounded(self) -> RunFeatures:
        """Features as stored (float16 values in float64), so metrics match a reload."""
        return RunFeatures(
            {s: {k: np.asarray(v, np.float16).astype(np.float64) for k, v in spaces.items()}
             for s, spaces in self.features.items()},
            {k: np.asarray(v, np.float32).astype(np.float64) for k, v in self.scores.items()},
            dict(self.groups), dict(self.meta))


def load_run_features(folder: str | Path) -> RunFeatures:
    """Read ``folder/features.safetensors`` written by an evaluation.

    Example:
        >>> run = load_run_features("eval/w4a8"); run.features["generated"]["global"].shape
        (2000, 256)
    """
    path = Path(folder) / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: evaluate the run again with this version of `qlip eval` (it "
            "writes per-image features; images already generated are not generated again)")
    arrays, meta = load_tensors(path, "delete it and run `qlip eval` again on the folder (the "
                                "images are kept; only the features are measured again)", "numpy")
    features: dict[str, dict[str, np.ndarray]] = {}
    scores, groups = {}, {}
    for key, value in arrays.items():
        kind, name = key.split(".", 1)
        if kind == "score":
            scores[name] = value.astype(np.float64)
        elif kind == "group":
            groups[name] = value.astype(np.int64)
        else:
            features.setdefault(kind, {})[name] = value.astype(np.float64)
    return RunFeatures(features, scores, groups, meta)


def extract_spaces(extractor, images: torch.Tensor,
                   names: Sequence[str] = ("global", "spatial", "fidelity")
                   ) -> dict[str, np.ndarray]:
    """The feature spaces ``names`` the extractor has (``fidelity`` only where it defines
    ``fidelity_features``)."""
    from ..metrics import extract_features

    spaces = {name: getattr(extractor, f"{name}_features") for name in names
              if hasattr(extractor, f"{name}_features")}
    return {name: extract_features(fn, images).numpy() for name, fn in spaces.items()}
