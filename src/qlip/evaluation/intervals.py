"""Every metric of a run with its 95% bootstrap interval, and paired differences of two runs,
computed from per-image features and scores (:class:`RunFeatures`).

One matrix of resample counts serves every metric of a comparison: a resample draws image
indices, and the same indices select the generated images, the real images of the same prompts
and (fidelity) the reference run's images of the same prompts and seeds. Two runs compared
share those counts too (a paired bootstrap).

Example:
    >>> run = load_run_features("eval/w4a8")
    >>> metrics_with_intervals(run)["intervals"]["fid"]
    [262.1, 281.4]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import fid_from_features
from ..metrics.bootstrap import (
    DEFAULT_BOOTSTRAP,
    BootstrapConfig,
    Interval,
    bootstrap_frechet,
    bootstrap_mmd,
    interval,
    resample_counts,
    weighted_means,
)
from ..metrics.kid import kernel_matrices, kid_from_features
from .run_features import RunFeatures

# Which direction is better, per metric (compare verdicts).
LOWER_IS_BETTER = {"fid", "sfid", "kid", "fid_fidelity", "kid_fidelity",
                   "fid_vs_reference", "kid_vs_reference", "fid_fidelity_vs_reference",
                   "image_mse_vs_reference", "perceptual_vs_reference"}
HIGHER_IS_BETTER = {"clip_score", "alignment", "giqa", "giqa_knn", "psnr_vs_reference"}
# The decision rule's measures (docs/metrics.md): quality is decided against FP, per image and on
# the global features, and by the text; FID/KID/sFID against real images are reported only.
DECIDING = ("psnr_vs_reference", "perceptual_vs_reference", "image_mse_vs_reference",
            "fid_vs_reference", "kid_vs_reference", "alignment", "clip_score")
# Set metrics: (name, set compared against, feature space, distance)
SET_METRICS = [
    ("fid", "real", "global", "frechet"), ("kid", "real", "global", "kid"),
    ("sfid", "real", "spatial", "frechet"),
    ("fid_fidelity", "real", "fidelity", "frechet"), ("kid_fidelity", "real", "fidelity", "kid"),
    ("fid_vs_reference", "reference", "global", "frechet"),
    ("kid_vs_reference", "reference", "global", "kid"),
    ("fid_fidelity_vs_reference", "reference", "fidelity", "frechet"),
]
MIN_IMAGES_FOR_SETS = 2


@dataclass
class SetMetric:
    """A set metric's estimate and its bootstrap samples, for one run."""

    name: str
    estimate: float
    samples: np.ndarray


def _frechet(a, b, counts_a, counts_b, config, paired: bool = False) -> tuple[float, np.ndarray]:
    try:
        estimate = fid_from_features(a, b)
    except ValueError:  # degenerate covariances (too few images): no estimate
        return float("nan"), np.full(len(counts_a), np.nan)
    return estimate, bootstrap_frechet(a, b, counts_a, counts_b, config=config).numpy()


def _kid(a, b, counts_a, counts_b, config, paired: bool = False) -> tuple[float, np.ndarray]:
    kernels = [k.to(config.device) for k in kernel_matrices(a, b)]
    if paired:
        samples = bootstrap_mmd(*kernels, counts_a.to(config.device), paired=True)
    else:
        samples = bootstrap_mmd(*kernels, counts_a.to(config.device), counts_b.to(config.device))
    return kid_from_features(a, b, paired), samples.cpu().numpy()


def is_paired(run: RunFeatures, other: str) -> bool:
    """Row i of ``other``'s features shows run image i's prompt and seed (the reference run), or
    its prompt's render (the reference world's real set)."""
    return other == "reference" or (other == "real" and run.real_paired)


DISTANCES: dict[str, Callable] = {"frechet": _frechet, "kid": _kid}


def set_metrics(run: RunFeatures, counts: torch.Tensor, config: BootstrapConfig
                ) -> list[SetMetric]:
    """Every set metric the run's features allow, with bootstrap samples under the first
    ``config.set_resamples`` rows of ``counts`` (the same rows for two paired runs)."""
    out = []
    if run.num_images < MIN_IMAGES_FOR_SETS:
        return out
    counts = counts[: config.set_resamples]
    generated = run.features["generated"]
    for name, other, space, distance in SET_METRICS:
        against = run.features.get(other, {})
        if space not in generated or space not in against:
            continue
        paired = is_paired(run, other)
        other_counts = counts  # paired sets: the same prompts resampled
        if not paired:
            other_counts = resample_counts(len(against[space]), len(counts), config.seed + 1)
        estimate, samples = DISTANCES[distance](against[space], generated[space], other_counts,
                                                counts, config, paired)
        out.append(SetMetric(name, estimate, samples))
    return out


def mean_metrics(run: RunFeatures, counts: torch.Tensor) -> list[SetMetric]:
    """Per-image scores: the mean and its resampled means."""
    return [SetMetric(name, float(np.mean(values)), weighted_means(counts, values).numpy())
            for name, values in run.scores.items()]


def all_metrics(run: RunFeatures, counts: torch.Tensor, config: BootstrapConfig,
                with_sets: bool = True) -> list[SetMetric]:
    return mean_metrics(run, counts) + (set_metrics(run, counts, config) if with_sets else [])


def set_estimates(run: RunFeatures) -> dict:
    """The set metrics' point estimates alone (no resampling)."""
    out = {}
    generated = run.features["generated"]
    for name, other, space, distance in SET_METRICS:
        against = run.features.get(other, {})
        if space in generated and space in against and run.num_images >= MIN_IMAGES_FOR_SETS:
            paired = is_paired(run, other)
            try:
                out[name] = _finite(
                    fid_from_features(against[space], generated[space]) if distance == "frechet"
                    else kid_from_features(against[space], generated[space], paired))
            except ValueError:  # degenerate covariances (too few images)
                out[name] = None
    return out


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def metrics_with_intervals(run: RunFeatures, config: BootstrapConfig = DEFAULT_BOOTSTRAP,
                           with_sets: bool = True) -> dict:
    """``{metric: estimate, ..., "intervals": {metric: [low, high]}}`` for one run
    (``with_sets=False``: per-image means only)."""
    counts = resample_counts(run.num_images, config.resamples, config.seed)
    out: dict = {"intervals": {}}
    for metric in all_metrics(run, counts, config, with_sets):
        got = interval(metric.estimate, metric.samples, config.level)
        out[metric.name] = _finite(got.estimate)
        out["intervals"][metric.name] = [_finite(got.low), _finite(got.high)]
    return out


def floor_interval(real, floor, config: BootstrapConfig = DEFAULT_BOOTSTRAP) -> Interval:
    """FID between two independent real sets, each resampled on its own."""
    counts_a = resample_counts(len(real), config.resamples, config.seed)
    counts_b = resample_counts(len(floor), config.resamples, config.seed + 1)
    samples = bootstrap_frechet(real, floor, counts_a, counts_b, config=config)
    return interval(fid_from_features(real, floor), samples, config.level)


@dataclass
class PairedDifference:
    """A − B for one metric, with its paired interval and the verdict."""

    name: str
    a: float
    b: float
    difference: Interval
    verdict: str


def verdict(name: str, difference: Interval, num_images: int) -> str:
    """'A better', 'B better' or 'not distinguishable at N images', by the metric's direction."""
    if not difference.excludes_zero() or name not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
        if name not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
            return "differs" if difference.excludes_zero() else "same"
        return f"not distinguishable at {num_images} images"
    a_higher = difference.low > 0
    return "A better" if a_higher == (name in HIGHER_IS_BETTER) else "B better"


def paired_differences(run_a: RunFeatures, run_b: RunFeatures,
                       config: BootstrapConfig = DEFAULT_BOOTSTRAP) -> list[PairedDifference]:
    """Every metric both runs have: A − B under the same resampled image indices."""
    counts = resample_counts(run_a.num_images, config.resamples, config.seed)
    metrics_a = {m.name: m for m in all_metrics(run_a, counts, config)}
    metrics_b = {m.name: m for m in all_metrics(run_b, counts, config)}
    out = []
    for name in [n for n in metrics_a if n in metrics_b]:
        a, b = metrics_a[name], metrics_b[name]
        difference = interval(a.estimate - b.estimate, a.samples - b.samples, config.level)
        out.append(PairedDifference(name, a.estimate, b.estimate, difference,
                                    verdict(name, difference, run_a.num_images)))
    return out


@dataclass
class Decision:
    """The decision rule on one comparison: A's quality is *kept* against B when A is not worse
    on every deciding measure (its paired interval includes zero or lies on the better side)."""

    measures: tuple[str, ...]  # the deciding measures both runs have
    worse: tuple[str, ...]  # where B is better
    better: tuple[str, ...]  # where A is better
    missing: tuple[str, ...]  # deciding measures the runs lack (no shared --reference-run)

    @property
    def kept(self) -> bool | None:
        """True/False by the rule; None when a deciding measure is missing (it cannot decide)."""
        return None if self.missing else not self.worse

    @property
    def overall(self) -> str:
        """"better" (not worse on any deciding measure and better on at least one), "not worse",
        "worse" (worse on at least one) or "undecided" (a deciding measure missing)."""
        if self.kept is None:
            return "undecided"
        return "worse" if not self.kept else "better" if self.better else "not worse"

    def sentence(self, label_a: str, label_b: str, num_images: int) -> str:
        if self.missing:
            return (f"The decision rule cannot decide: {', '.join(self.missing)} missing (evaluate "
                    "both runs with the same --reference-run).")
        if self.worse:
            return (f"{label_a} is worse than {label_b} at {num_images} images on "
                    f"{', '.join(self.worse)}: quality not kept.")
        better = f"; better on {', '.join(self.better)}" if self.better else ""
        return (f"{label_a} is not worse than {label_b} on any of the {len(self.measures)} "
                f"deciding measures at {num_images} images: quality kept{better}.")


def decide(verdicts: dict[str, str]) -> Decision:
    """The decision rule of docs/metrics.md over a comparison's verdicts (metric -> "A better",
    "B better" or "not distinguishable ...", as :func:`verdict` gives and `qlip compare --json`
    stores)."""
    measures = tuple(m for m in DECIDING if m in verdicts)
    return Decision(measures, tuple(m for m in measures if verdicts[m] == "B better"),
                    tuple(m for m in measures if verdicts[m] == "A better"),
                    tuple(m for m in DECIDING if m not in verdicts))
