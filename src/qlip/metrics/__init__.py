"""Image-quality and alignment metrics; each takes features or an extractor, never a fixed network."""

from qlip.metrics.alignment import (
    AlignmentResult,
    PredictedObject,
    PredictedScene,
    PromptAlignment,
    align_prompt,
    alignment,
)
from qlip.metrics.clip_score import ClipScoreResult, clip_score, to_torchmetrics_scale
from qlip.metrics.complexity import image_complexity
from qlip.metrics.correlation import plcc, srocc
from qlip.metrics.features import (
    FeatureExtractor,
    HFCLIPScorer,
    ImageTextScorer,
    InceptionExtractor,
    check_images,
)
from qlip.metrics.fid import (
    GaussianStatistics,
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_from_images,
    frechet_distance,
)
from qlip.metrics.giqa import GMMGIQA, KNNGIQA, rank_normalize
from qlip.metrics.realism import RealismScore
from qlip.metrics.sfid import sfid_from_features, sfid_from_images

__all__ = [
    "GMMGIQA",
    "KNNGIQA",
    "AlignmentResult",
    "ClipScoreResult",
    "FeatureExtractor",
    "GaussianStatistics",
    "HFCLIPScorer",
    "ImageTextScorer",
    "InceptionExtractor",
    "PredictedObject",
    "PredictedScene",
    "PromptAlignment",
    "RealismScore",
    "align_prompt",
    "alignment",
    "check_images",
    "clip_score",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "fid_from_images",
    "frechet_distance",
    "image_complexity",
    "plcc",
    "rank_normalize",
    "sfid_from_features",
    "sfid_from_images",
    "srocc",
    "to_torchmetrics_scale",
]
