"""T2Q's labels: one raw score per FP generation, then its percentile among the training prompts'
scores (``rank_normalize``: raw GIQA log-likelihoods span orders of magnitude, ranks do not).

| label | raw score of prompt i | from |
|---|---|---|
| ``giqa`` (default) | GMM-GIQA log-likelihood of its image's features (K = 5, full, PCA 95%) | real features |
| ``giqa_knn`` | KNN-GIQA, Σ_{k ≤ K} 1/‖f − f_k‖₁ (K = 1) | real features |
| ``realism`` | realism score (Kynkäänniemi et al. 2019, k = 3, half the radii kept) | real features |
| ``image_text`` | image–text cosine of image and prompt (the CLIP-score analogue) | the scorer |
| ``sensitivity`` | mean (ε_fp − ε_q)² at the lowest bit option along its FP trajectory | the quantized UNet |
| ``complexity`` | its FP image's mean luminance gradient magnitude (T2Q trained on it is T2C) | the FP image |
| ``length`` | its token count (start and end tokens included) | the tokenizer |

Higher always means "give this prompt more bits": a better image (GIQA, realism, image–text) as
in the paper, a larger loss to quantization (sensitivity), a busier image (complexity) or a
longer prompt (length). The last two are the selection criteria QLIP's Table S3 compares with
quality; T2Q's network learns them from the text like any other label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import GMMGIQA, KNNGIQA, RealismScore, rank_normalize

LABELS = ("giqa", "giqa_knn", "realism", "image_text", "sensitivity", "complexity", "length")
REAL_FEATURE_LABELS = ("giqa", "giqa_knn", "realism")


@dataclass
class LabelConfig:
    label: str = "giqa"
    giqa_components: int = 5  # GMM-GIQA's K
    giqa_pca: float | None = 0.95  # variance GMM-GIQA's PCA keeps (None: no PCA)
    knn_k: int = 1  # KNN-GIQA's K
    realism_k: int = 3
    realism_keep: float = 0.5

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}; got {self.label!r}")

    @property
    def needs_real(self) -> bool:
        return self.label in REAL_FEATURE_LABELS

    def fingerprint(self) -> dict:
        """The fields that decide this label's scores."""
        keys = {"giqa": ("giqa_components", "giqa_pca"), "giqa_knn": ("knn_k",),
                "realism": ("realism_k", "realism_keep")}.get(self.label, ())
        return {"label": self.label, **{k: getattr(self, k) for k in keys}}


def label_inputs(config: LabelConfig, data: dict[str, torch.Tensor],
                 real: torch.Tensor | None = None, sensitivity: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`raw_scores` reads for ``config``'s label. Caches fingerprint these, not
    the scores: a fitted scorer (GIQA's PCA and GMM, the realism score's neighbours) runs on
    multi-threaded BLAS, whose last bits can change from one run to the next."""
    wanted = {"giqa": ("features", "real"), "giqa_knn": ("features", "real"),
              "realism": ("features", "real"), "image_text": ("image_text",),
              "complexity": ("complexity",), "length": ("lengths",),
              "sensitivity": ("sensitivity",)}[config.label]
    given = {**data, "real": real, "sensitivity": sensitivity, "lengths": lengths}
    return {k: given[k] for k in wanted if given.get(k) is not None}


def raw_scores(config: LabelConfig, data: dict[str, torch.Tensor],
               real: torch.Tensor | None = None, sensitivity: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None) -> np.ndarray:
    """``[N]`` raw scores of the T2Q data ``data`` (``features`` [N, D], ``image_text`` [N],
    ``complexity`` [N]); ``lengths`` [N]: the prompts' token counts (the length label)."""
    label = config.label
    if label in REAL_FEATURE_LABELS and real is None:
        raise ValueError(f"the {label} label needs real images' features")
    if label == "giqa":
        model = GMMGIQA(config.giqa_components, config.giqa_pca).fit(real)
        return model.score(data["features"])
    if label == "giqa_knn":
        return KNNGIQA(config.knn_k).fit(real).score(data["features"])
    if label == "realism":
        return RealismScore(config.realism_k, config.realism_keep).fit(real).score(data["features"])
    if label == "image_text":
        if "image_text" not in data:
            raise ValueError("the image_text label needs an image-text scorer: on a user's model "
                             "pass --clip DIR (a local CLIP model folder)")
        return data["image_text"].double().numpy()
    if label == "complexity":
        if "complexity" not in data:
            raise ValueError("the complexity label needs the FP images' complexity: this T2Q "
                             "data was measured without it; rerun with --redo-stale")
        return data["complexity"].double().numpy()
    if label == "length":
        if lengths is None:
            raise ValueError("the length label needs the prompts' token counts")
        return lengths.double().numpy()
    if sensitivity is None:
        raise ValueError("the sensitivity label needs the prompts' quantization sensitivity")
    return sensitivity.double().numpy()


def normalized_labels(raw: np.ndarray) -> torch.Tensor:
    """Each score's percentile among all of them, in (0, 1] (``rank_normalize``)."""
    raw = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(raw).all():
        raise ValueError(f"{int((~np.isfinite(raw)).sum())} raw label scores are not finite")
    return torch.from_numpy(rank_normalize(raw, raw)).float()
