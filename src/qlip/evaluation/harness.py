"""Generate (resumably), measure against real images, write metrics.json, metrics.md and a grid."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import crash_point, note, read_json_dict, write_atomic
from ..metrics import (
    GMMGIQA,
    KNNGIQA,
    FeatureExtractor,
    ImageTextScorer,
    alignment,
    clip_score,
    extract_features,
)
from ..metrics.bootstrap import BootstrapConfig
from ..metrics.fidelity import psnr
from ..pipeline import GenerationConfig, generate
from ..pipeline.prompts import check_prompts, truncation_note
from ..policies import BitPolicy
from .intervals import floor_interval, metrics_with_intervals, set_estimates
from .report import save_grid, write_markdown
from .run_features import RunFeatures, extract_spaces, load_run_features, pairs_digest
from .shard import Shard
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
    batch_mode: str = "max"  # GenerationConfig.batch_mode: "max" or "per_image"
    truncate: bool = False  # cut prompts over the tokenizer's limit instead of refusing them
    height: int | None = None  # pixels; None: the pipeline's own resolution
    width: int | None = None
    # how the quantized layers run: "simulated", or "real kernels" (--real-kernels), and
    # whether compiled; kept in settings.json, so a folder is not resumed the other way
    execution: str = "simulated"
    compile: str | None = None  # GenerationConfig.compile: torch.compile's mode, None: eager


@dataclass
class Measures:
    """What measures the images: a feature extractor, real images, and optional parts."""

    extractor: FeatureExtractor
    real_images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    scorer: ImageTextScorer | None = None
    floor_images: torch.Tensor | None = None  # a second independent real set: the FID floor
    reader: object | None = None  # reference world: an evaluator with .predict(images)
    perceptual: object | None = None  # .distance(a, b) -> [N]: perceptual distance to reference
    real_paired: bool = False  # real image i shows prompt i (reference world renders)
    notes: list[str] = field(default_factory=list)


def generate_missing(
    pipe, prompts: Sequence[EvalPrompt], policy: BitPolicy | None, config: EvalConfig,
    store: ImageStore, shard: Shard | None = None,
) -> None:
    """Generate the images the store lacks, batch by batch, writing each batch as it comes;
    under ``shard``, only this rank's batches (the single-process run's batch k is rank
    ``k % world``'s)."""
    shard = shard or Shard()
    seeds = [config.seed + i for i in range(len(prompts))]
    over = check_prompts(pipe, [p.text for p in prompts], config.truncate)
    if over:
        note(truncation_note(over, len(prompts), pipe.tokenizer.model_max_length))
    for i, prompt in enumerate(prompts):
        store.check_matches(i, prompt.text, seeds[i])
    store.check_settings({"steps": config.steps, "guidance": config.guidance,
                          "batch_mode": config.batch_mode, "height": config.height,
                          "width": config.width, "execution": config.execution,
                          "policy": policy.describe() if policy is not None else "full precision"},
                         write=shard.is_main)
    todo = store.missing(len(prompts))
    # every rank has read the records before any rank writes one, so all number the same
    # batches of the same todo list
    shard.barrier()
    if store.records and todo and shard.is_main:
        note(f"resuming {store.root}: {len(prompts) - len(todo)} of {len(prompts)} images are "
             f"there, generating the other {len(todo)}")
    gen = GenerationConfig(steps=config.steps, guidance=config.guidance, batch_mode=config.batch_mode,
                           batch_size=config.batch_size, truncate=config.truncate,
                           height=config.height, width=config.width, compile=config.compile)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="generating", unit="img",
               disable=not shard.is_main)
    for number, start in enumerate(range(0, len(todo), config.batch_size)):
        batch = todo[start : start + config.batch_size]
        if not shard.owns(number):
            continue
        result = generate(pipe, [prompts[i].text for i in batch], [seeds[i] for i in batch],
                          policy, gen, progress=False)
        if result.bits is not None:
            store.add_bits(batch, result.bits, result.requested, result.unit_names)
        store.add_batch(batch, result.images, [{**report.to_dict(), "richness": prompts[i].richness}
                                               for i, report in zip(batch, result.reports)])
        crash_point("eval-batch")
        bar.update(len(batch))
    bar.close()


DEFAULT_BOOTSTRAP = BootstrapConfig()
REFERENCE_SPACES = ("global", "fidelity")  # what the set metrics to the reference read
COST_KEYS = ("fab", "fab_requested", "weighted_bits", "bitops_t")


def _per_image_scores(
    images: torch.Tensor, prompts: Sequence[EvalPrompt], records: list[dict], measures: Measures,
    features: dict, reference_images: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """Per-image scores: GIQA (against the real features), CLIP score, alignment, costs, and
    fidelity to the reference run's image of the same prompt and seed."""
    generated_global = torch.from_numpy(features["generated"]["global"])
    real = torch.from_numpy(features["real"]["global"])
    scores = {"giqa": np.asarray(GMMGIQA().fit(real).score(generated_global)),
              "giqa_knn": np.asarray(KNNGIQA().fit(real).score(generated_global))}
    if measures.scorer is not None:
        scores["clip_score"] = clip_score(
            measures.scorer, images, [p.text for p in prompts]).per_image.numpy()
    if measures.reader is not None and all(p.world_prompt is not None for p in prompts):
        predictions = measures.reader.predict(images)
        scores["alignment"] = alignment([p.world_prompt for p in prompts], predictions).scores
    for key in COST_KEYS:
        if all(r.get(key) is not None for r in records):
            scores[key] = np.array([r[key] for r in records], dtype=np.float64)
    if reference_images is not None:  # the same seeds from another run (e.g. FP)
        diff = (images - reference_images) * 2  # on the [-1, 1] scale of earlier tables
        scores["image_mse_vs_reference"] = diff.pow(2).flatten(1).mean(1).numpy()
        scores["psnr_vs_reference"] = psnr(images, reference_images)
        if measures.perceptual is not None:
            scores["perceptual_vs_reference"] = measures.perceptual.distance(
                images, reference_images)
    return scores


def _groups(prompts: Sequence[EvalPrompt]) -> dict[str, np.ndarray]:
    groups = {"richness": np.array([-1 if p.richness is None else p.richness for p in prompts])}
    if all(p.world_prompt is not None for p in prompts):  # reference world: objects drawn
        groups["objects"] = np.array([len(p.world_prompt.scene.objects) for p in prompts])
    return groups


def measure_run(
    images: torch.Tensor, prompts: Sequence[EvalPrompt], records: list[dict], measures: Measures,
    reference_images: torch.Tensor | None = None,
) -> RunFeatures:
    """Per-image features of the generated, real (and reference-run) images and per-image
    scores: everything the metrics are computed from."""
    features = {"generated": extract_spaces(measures.extractor, images),
                "real": extract_spaces(measures.extractor, measures.real_images)}
    if reference_images is not None:
        features["reference"] = extract_spaces(measures.extractor, reference_images,
                                               REFERENCE_SPACES)
    scores = _per_image_scores(images, prompts, records, measures, features, reference_images)
    seeds = [r.get("seed") for r in records]
    meta = {"pairs": pairs_digest([p.text for p in prompts], seeds),
            "num_images": str(len(prompts)), "real_paired": str(int(measures.real_paired))}
    return RunFeatures(features, scores, _groups(prompts), meta)


def _grouped(run: RunFeatures, name: str, min_images: int, config: BootstrapConfig) -> dict:
    """Per value of a group (richness level, objects): per-image means with intervals, and set
    metrics (FID, sFID, KID) as point estimates for groups of at least ``min_images`` images.
    Per-group FIDs measure how much of the scene the prompt fixes more than quality
    (docs/reference-world.md), and their resampling would cost minutes per run."""
    out = {}
    for value in sorted(set(run.groups[name].tolist()) - {-1}):
        part = run.subset(np.nonzero(run.groups[name] == value)[0])
        metrics = metrics_with_intervals(part, config, with_sets=False)
        if part.num_images >= min_images:
            metrics.update(set_estimates(part))
        out[str(value)] = {"num_images": part.num_images, **metrics}
    return out


def compute_metrics(
    run: RunFeatures, measures: Measures, config: EvalConfig,
    bootstrap: BootstrapConfig | None = None,
) -> dict:
    """Every metric of a run with its interval, overall and per richness level / object count
    (``bootstrap=None``: ``DEFAULT_BOOTSTRAP``)."""
    bootstrap = bootstrap or DEFAULT_BOOTSTRAP
    notes = list(measures.notes)
    metrics = {"num_images": run.num_images, **metrics_with_intervals(run, bootstrap)}
    for name in ("fid", "sfid", "clip_score"):
        metrics.setdefault(name, None)
    if measures.floor_images is not None:
        floor = extract_features(measures.extractor.global_features, measures.floor_images)
        got = floor_interval(run.features["real"]["global"], floor.numpy(), bootstrap)
        metrics["fid_floor"] = got.estimate
        metrics["intervals"]["fid_floor"] = got.to_list()
    for name, key in (("richness", "by_richness"), ("objects", "by_objects")):
        if name in run.groups and (run.groups[name] >= 0).any():
            metrics[key] = _grouped(run, name, config.min_images_for_fid, bootstrap)
    metrics["bootstrap"] = {"resamples": bootstrap.resamples, "seed": bootstrap.seed,
                            "level": bootstrap.level,
                            "interval": "percentile, re-centred on the estimate"}
    metrics["notes"] = notes
    return metrics


def recompute_metrics(folder: str | Path, bootstrap: BootstrapConfig | None = None,
                      min_images_for_fid: int = EvalConfig.min_images_for_fid) -> dict:
    """Recompute an evaluation's metrics and intervals from its ``features.safetensors`` alone
    (no images, no model: after a metric's estimator changed) and rewrite ``metrics.json``. What
    the features cannot give again (the real-vs-real FID floor, the label, notes) is kept from
    the old file, and a note says that the metrics were recomputed.

    >>> recompute_metrics("runs/eval/w4a8")  # doctest: +SKIP
    """
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate the run first (`qlip eval`)")
    old = read_json_dict(path, "evaluate the run again (`qlip eval`; its images are reused)")
    run = load_run_features(folder)
    bootstrap = bootstrap or DEFAULT_BOOTSTRAP
    metrics = {"num_images": run.num_images, **metrics_with_intervals(run, bootstrap)}
    for name, key in (("richness", "by_richness"), ("objects", "by_objects")):
        if name in run.groups and (run.groups[name] >= 0).any():
            metrics[key] = _grouped(run, name, min_images_for_fid, bootstrap)
    for key in ("fid_floor", "label"):
        if key in old:
            metrics[key] = old[key]
    if "fid_floor" in old.get("intervals", {}):
        metrics["intervals"]["fid_floor"] = old["intervals"]["fid_floor"]
    metrics["bootstrap"] = {"resamples": bootstrap.resamples, "seed": bootstrap.seed,
                            "level": bootstrap.level,
                            "interval": "percentile, re-centred on the estimate"}
    metrics["notes"] = [*old.get("notes", []),
                        "metrics recomputed from features.safetensors (recompute_metrics)"]
    for key, value in old.items():  # anything else the evaluation wrote (cost, settings)
        metrics.setdefault(key, value)
    write_atomic(path, json.dumps(metrics, indent=2))
    write_markdown(metrics, folder / "metrics.md")
    return metrics


def check_reference(folder: str | Path, prompts: Sequence[EvalPrompt], config: EvalConfig
                    ) -> ImageStore:
    """The reference run's store, refused (before any work) unless it holds every image of the
    same prompts and seeds."""
    other = ImageStore(folder)
    missing = other.missing(len(prompts))
    if missing:
        raise ValueError(f"reference run {folder} lacks image {missing[0]} of {len(prompts)}: "
                         "finish that evaluation first (it resumes)")
    for i, prompt in enumerate(prompts):
        record = other.records[i]
        if record.get("prompt") != prompt.text or record.get("seed") != config.seed + i:
            raise ValueError(
                f"reference run {folder} is not of the same prompts and seeds: image {i} is "
                f"{record.get('prompt')!r} seed {record.get('seed')}, this run's is "
                f"{prompt.text!r} seed {config.seed + i}; evaluate both with the same --prompts, "
                "--num-images and --seed")
    return other


def run_evaluation(
    pipe, prompts: Sequence[EvalPrompt], policy: BitPolicy | None, config: EvalConfig,
    out_dir: str | Path, measures_fn, reference_run: str | Path | None = None,
    label: str = "", bootstrap: BootstrapConfig | None = None, shard: Shard | None = None,
) -> dict | None:
    """Generate ``len(prompts)`` images into ``out_dir`` (resuming), measure them with the
    :class:`Measures` that ``measures_fn(image_size)`` builds, and write the reports. Under
    ``shard`` every rank generates its share; rank 0 then measures and returns the metrics,
    the other ranks return None."""
    shard = shard or Shard()
    out = Path(out_dir)
    other = check_reference(reference_run, prompts, config) if reference_run else None
    if not shard.is_main:
        shard.barrier()  # rank 0 has cleaned the folder of a killed run's temporary files
    store = ImageStore(out, shard.rank)
    if shard.is_main:
        shard.barrier()
    started = time.perf_counter()
    generate_missing(pipe, prompts, policy, config, store, shard)
    shard.barrier()  # every rank's images and records are written
    if not shard.is_main:
        return None
    generated = time.perf_counter()
    store.merge_shards()
    store.write_bits(len(prompts))  # bits.safetensors: every image's bits per step and unit
    images = store.load_images(len(prompts))
    records = [store.records[i] for i in range(len(prompts))]
    reference = other.load_images(len(prompts)) if other is not None else None
    measures = measures_fn(images.shape[-1])
    run = measure_run(images, prompts, records, measures, reference)
    run.meta |= {"label": label, "reference_run": str(reference_run or "")}
    run.save(out)
    measured = time.perf_counter()
    metrics = compute_metrics(run.rounded(), measures, config, bootstrap)
    metrics["label"] = label
    metrics["config"] = asdict(config)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    # where this process's time went, apart from metrics.json (which the same images and
    # settings reproduce byte for byte); generation counts only the images this run made
    wall = {"generation": round(generated - started, 1), "features": round(measured - generated, 1),
            "metrics": round(time.perf_counter() - measured, 1)}
    write_atomic(out / "timings.json", json.dumps(wall, indent=1))
    write_markdown(metrics, out / "metrics.md")
    save_grid(images[:64], out / "grid.png")
    return metrics
