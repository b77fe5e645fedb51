"""Generate (resumably), measure against real images, write metrics.json, metrics.md and a grid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..metrics import (
    GMMGIQA,
    KNNGIQA,
    FeatureExtractor,
    ImageTextScorer,
    alignment,
    clip_score,
    extract_features,
    fid_from_features,
)
from ..pipeline import GenerationConfig, generate
from ..policies import BitPolicy
from .report import save_grid, write_markdown
from .store import ImageStore


@dataclass
class EvalPrompt:
    text: str
    richness: int | None = None
    world_prompt: object | None = None  # the reference world's Prompt (scene, mentions), if any


@dataclass
class EvalConfig:
    num_images: int = 1000
    batch_size: int = 16
    seed: int = 0  # image i uses seed + i
    steps: int = 25
    guidance: float = 4.0
    min_images_for_fid: int = 50  # per-richness FID only for levels with at least this many


@dataclass
class Measures:
    """What measures the images: a feature extractor, real images, and optional parts."""

    extractor: FeatureExtractor
    real_images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    scorer: ImageTextScorer | None = None
    floor_images: torch.Tensor | None = None  # a second independent real set: the FID floor
    reader: object | None = None  # reference world: an evaluator with .predict(images)
    notes: list[str] = field(default_factory=list)


def generate_missing(
    pipe, prompts: Sequence[EvalPrompt], policy: BitPolicy | None, config: EvalConfig,
    store: ImageStore,
) -> None:
    """Generate the images the store lacks, batch by batch, writing each batch as it comes."""
    seeds = [config.seed + i for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        store.check_matches(i, prompt.text, seeds[i])
    todo = store.missing(len(prompts))
    gen = GenerationConfig(steps=config.steps, guidance=config.guidance,
                           batch_size=config.batch_size, truncate=True)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="generating", unit="img")
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        result = generate(pipe, [prompts[i].text for i in batch], [seeds[i] for i in batch],
                          policy, gen, progress=False)
        for i, image, report in zip(batch, result.images, result.reports):
            store.add(i, image, {**report.to_dict(), "richness": prompts[i].richness})
        bar.update(len(batch))
    bar.close()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _summary(
    index: np.ndarray, records: list[dict], per_image: dict[str, np.ndarray],
    gen_feats: torch.Tensor, real_feats: torch.Tensor, min_fid: int, notes: list[str],
) -> dict:
    out = {"num_images": int(len(index))}
    for key in ("fab", "fab_requested", "weighted_bits", "bitops_t"):
        out[key] = _mean(records[i][key] for i in index)
    for key, values in per_image.items():
        out[key] = float(values[index].mean())
    if len(index) >= min_fid:
        out["fid"] = _distance(real_feats[index], gen_feats[index], notes, "FID")
    return out


def _distance(a: torch.Tensor, b: torch.Tensor, notes: list[str], what: str) -> float | None:
    """Fréchet distance, or None (with a note) when the covariances of too few images are too
    degenerate for a stable matrix square root: the other metrics are still worth writing."""
    try:
        return fid_from_features(a, b)
    except ValueError as error:
        notes.append(f"{what} not computed on {len(a)} vs {len(b)} images: {error}")
        return None


def compute_metrics(
    images: torch.Tensor, prompts: Sequence[EvalPrompt], records: list[dict], measures: Measures,
    config: EvalConfig, reference_images: torch.Tensor | None = None,
) -> dict:
    """Every metric of a run, overall and per richness level."""
    ex = measures.extractor
    gen_g = extract_features(ex.global_features, images)
    real_g = extract_features(ex.global_features, measures.real_images)
    gen_s = extract_features(ex.spatial_features, images)
    real_s = extract_features(ex.spatial_features, measures.real_images)
    gmm, knn = GMMGIQA().fit(real_g), KNNGIQA().fit(real_g)
    per_image = {"giqa": np.asarray(gmm.score(gen_g)), "giqa_knn": np.asarray(knn.score(gen_g))}
    if measures.scorer is not None:
        per_image["clip_score"] = clip_score(
            measures.scorer, images, [p.text for p in prompts]).per_image.numpy()
    if measures.reader is not None and all(p.world_prompt is not None for p in prompts):
        predictions = measures.reader.predict(images)
        per_image["alignment"] = alignment([p.world_prompt for p in prompts], predictions).scores
    if reference_images is not None:  # the same seeds from another run (e.g. FP), in [-1, 1]
        diff = (images - reference_images) * 2
        per_image["image_mse_vs_reference"] = diff.pow(2).flatten(1).mean(1).numpy()
    everything = np.arange(len(images))
    notes = list(measures.notes)
    metrics = _summary(everything, records, per_image, gen_g, real_g, 2, notes)
    metrics["sfid"] = _distance(real_s, gen_s, notes, "sFID")
    metrics.setdefault("clip_score", None)
    if measures.floor_images is not None:
        floor = extract_features(ex.global_features, measures.floor_images)
        metrics["fid_floor"] = _distance(real_g, floor, notes, "FID floor")
    levels = sorted({p.richness for p in prompts if p.richness is not None})
    richness = np.array([-1 if p.richness is None else p.richness for p in prompts])
    metrics["by_richness"] = {
        str(level): _summary(np.nonzero(richness == level)[0], records, per_image, gen_g, real_g,
                             config.min_images_for_fid, notes)
        for level in levels
    }
    if all(p.world_prompt is not None for p in prompts):  # reference world: by objects drawn
        objects = np.array([len(p.world_prompt.scene.objects) for p in prompts])
        metrics["by_objects"] = {
            str(count): _summary(np.nonzero(objects == count)[0], records, per_image, gen_g,
                                 real_g, config.min_images_for_fid, notes)
            for count in sorted(set(objects.tolist()))
        }
    metrics["notes"] = notes
    return metrics


def run_evaluation(
    pipe, prompts: Sequence[EvalPrompt], policy: BitPolicy | None, config: EvalConfig,
    out_dir: str | Path, measures_fn, reference_run: str | Path | None = None,
    label: str = "",
) -> dict:
    """Generate ``len(prompts)`` images into ``out_dir`` (resuming), measure them with the
    :class:`Measures` that ``measures_fn(image_size)`` builds, and write the reports."""
    out = Path(out_dir)
    store = ImageStore(out)
    generate_missing(pipe, prompts, policy, config, store)
    images = store.load_images(len(prompts))
    records = [store.records[i] for i in range(len(prompts))]
    reference = None
    if reference_run is not None:
        other = ImageStore(reference_run)
        if other.missing(len(prompts)):
            raise ValueError(f"{reference_run} has fewer than {len(prompts)} images to compare with")
        reference = other.load_images(len(prompts))
    measures = measures_fn(images.shape[-1])
    metrics = compute_metrics(images, prompts, records, measures, config, reference)
    metrics["label"] = label
    metrics["config"] = asdict(config)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown(metrics, out / "metrics.md")
    save_grid(images[:64], out / "grid.png")
    return metrics
