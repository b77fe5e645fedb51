"""`qlip plot-qlip`: QLIP's five figures for a trained model folder, plus ``figures.json`` with
the numbers they show.

The bits are what QLIP asks for each prompt alone (T2Q once, Q2B's argmax per step: the
``requested`` bits of ``report.json``, what ``per_image`` batches run); the FAB of a prompt is
their mean over the FAB layers (the quantized Linear/Conv units, fixed ones at their own bits)
and the sampling steps, as the ledger counts it. Only the example scenes of Fig. S4 are
generated (their images); everything else costs one T2Q/Q2B pass per prompt. Fig. S1's FAB in
``max`` mode groups the same prompts into batches of consecutive prompts, as an eval batches
them, each layer and step at the batch's largest request (what the seam's ``max`` mode runs).
The fifth, ``q2b_direction.png``, is the direction of the allocation Q2B learned: the FAB Q2B
gives as a function of the quality T2Q predicts, beside the qualities T2Q predicts for the
held-out prompts and for each caption richness (issue 12's question of which way the bits go).

>>> make_figures(QLIPFiguresConfig("runs/qd-w4-qlip", out="runs/figures"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..nn import QuantUnit, quant_units
from ..pipeline import GenerationConfig, generate, load_for_sampling, load_pipeline
from ..pipeline.generate import dynamic_units
from ..pipeline.prompts import encode_prompt_batch
from ..policies import QLIPPolicy
from .plots import (
    plot_bit_share,
    plot_bits_heatmap,
    plot_fab_by_batch_size,
    plot_fab_by_richness,
    plot_q2b_direction,
)
from .reach import fab, q2b_fab

REFERENCE = "reference"


@dataclass
class QLIPFiguresConfig:
    quantized: str = ""  # a folder with qlip.json (`qlip train-qlip`)
    out: str = "figures"
    model: str = REFERENCE
    device: str = "cpu"
    prompts: str = "heldout"  # Fig. S3's prompts: the reference world's held-out set or a file
    num_prompts: int = 1000
    richness_captions: str | None = None  # user models: groups of captions, blank-line separated
    example_scenes: int = 3  # Fig. S4: scenes shown with their images
    curve_scenes: int = 200  # Fig. S4: scenes the FAB-per-level curve averages
    seed: int = 0
    guidance: float = 4.0
    batch_size: int = 64
    s1_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)  # Fig. S1: FAB in max mode per batch size

    def __post_init__(self):
        if not self.quantized:
            raise ValueError("QLIPFiguresConfig.quantized: pass --quantized DIR (with qlip.json)")
        if min(self.num_prompts, self.example_scenes, self.curve_scenes, self.batch_size) < 1:
            raise ValueError("--num-prompts, --example-scenes, --curve-scenes and --batch-size "
                             "must be at least 1")


def planned(pipe, policy: QLIPPolicy, prompts: list[str], batch_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """One T2Q/Q2B pass over ``prompts``: ``[N, S, U]`` QLIP's bits for each prompt alone (U =
    the dynamic units, policy order) and ``[N]`` T2Q's predicted quality, what Q2B reads (0.5
    for every prompt under a timestep-only Q2B)."""
    steps, bits, quality = policy.modules.q2b.num_steps, [], []
    for start in range(0, len(prompts), batch_size):
        policy.begin(encode_prompt_batch(pipe, prompts[start : start + batch_size]), steps)
        timestep = torch.zeros(())
        bits.append(torch.stack([policy.bits(s, timestep) for s in range(steps)], 1).cpu())
        quality.append(policy.quality.float().cpu())
    return torch.cat(bits).numpy(), torch.cat(quality).numpy()


def requested_bits(pipe, policy: QLIPPolicy, prompts: list[str], batch_size: int) -> np.ndarray:
    """``[N, S, U]`` QLIP's bits for each prompt alone (:func:`planned`)."""
    return planned(pipe, policy, prompts, batch_size)[0]


def predicted_quality(pipe, policy: QLIPPolicy, prompts: list[str], batch_size: int) -> np.ndarray:
    """``[N]`` T2Q's predicted quality of each prompt (:func:`planned`)."""
    return planned(pipe, policy, prompts, batch_size)[1]


def fab_by_batch_size(bits: np.ndarray, units: dict[str, QuantUnit], dynamic: list[str],
                      sizes: tuple[int, ...]) -> dict[int, float]:
    """Mean FAB per image in ``max`` mode for each batch size: ``bits [N, S, U]`` (each prompt
    alone) split into batches of consecutive prompts (the last one shorter), each layer and step
    of a batch at its largest request."""
    out = {}
    for size in sizes:
        per_image = []
        for start in range(0, len(bits), size):
            batch = bits[start : start + size]
            per_image += [float(fab(batch.max(axis=0, keepdims=True), units, dynamic)[0])] * len(batch)
        out[size] = float(np.mean(per_image))
    return out


def _s3_prompts(config: QLIPFiguresConfig) -> list[str]:
    if config.prompts == "heldout":
        if config.model != REFERENCE:
            raise ValueError("--prompts heldout is the reference world's; pass --prompts FILE")
        from ..evaluation.cli import select_prompts

        return [p.text for p in select_prompts("heldout", config.num_prompts, True)]
    from ..cli_args import read_prompt_file

    return read_prompt_file(config.prompts)[: config.num_prompts]


def _series(config: QLIPFiguresConfig, scenes: int, seed: int) -> list[list[str]]:
    """Groups of richness-controlled captions, one group a scene."""
    if config.richness_captions:
        groups = Path(config.richness_captions).read_text().strip().split("\n\n")
        return [[line.strip() for line in g.splitlines() if line.strip()] for g in groups][:scenes]
    if config.model != REFERENCE:
        raise ValueError("--richness-captions FILE is needed for a model other than the reference "
                         "model (groups of captions of rising richness, blank-line separated)")
    from ..world.domain import RICHNESS_LEVELS, richness_series

    texts = [p.text for p in richness_series(scenes, seed)]
    return [texts[i : i + len(RICHNESS_LEVELS)] for i in range(0, len(texts), len(RICHNESS_LEVELS))]


def _examples(pipe, policy, groups: list[list[str]], config: QLIPFiguresConfig) -> list[dict]:
    gen = GenerationConfig(steps=policy.modules.q2b.num_steps, guidance=config.guidance,
                           batch_size=config.batch_size, batch_mode="per_image")
    examples = []
    for i, captions in enumerate(groups):
        result = generate(pipe, captions, [config.seed + i] * len(captions), policy, gen,
                          progress=False)
        examples.append({"captions": captions, "fab": [r.fab for r in result.reports],
                         "images": [np.asarray(im.convert("RGB")) for im in result.images]})
    return examples


def make_figures(config: QLIPFiguresConfig) -> dict:
    """Write ``bit_share_per_layer.png``, ``fab_by_batch_size.png``, ``fab_by_richness.png``,
    ``bits_per_step.png``, ``q2b_direction.png`` and ``figures.json`` into ``config.out``;
    returns the numbers."""
    pipe = load_pipeline(config.model, config.device)
    policy = load_for_sampling(pipe, config.quantized)
    if not isinstance(policy, QLIPPolicy):
        raise FileNotFoundError(f"{config.quantized} holds no trained QLIP (qlip.json): run "
                                "`qlip train-qlip --quantized DIR` first")
    units = quant_units(pipe.unet)
    dynamic = list(dynamic_units(units))
    policy.bind({n: units[n].options for n in dynamic})
    options = list(policy.modules.q2b.config.bits)
    out = Path(config.out)
    name = f"QLIP A{{{','.join(map(str, options))}}} ({Path(config.quantized).name})"

    prompts = _s3_prompts(config)
    bits, heldout_quality = planned(pipe, policy, prompts, config.batch_size)
    plot_bit_share(bits, dynamic, options, out / "bit_share_per_layer.png",
                   f"{name}: share of each bit-width per layer, {len(prompts)} prompts × "
                   f"{bits.shape[1]} steps (the first {policy.modules.q2b.config.high_steps} "
                   "forced high)")
    per_image = float(fab(bits, units, dynamic).mean())
    by_size = fab_by_batch_size(bits, units, dynamic, config.s1_batch_sizes)
    plot_fab_by_batch_size(by_size, per_image, out / "fab_by_batch_size.png",
                           f"{name}: FAB against batch size, {len(prompts)} prompts")
    groups = _series(config, config.curve_scenes, config.seed)
    curve_bits, curve_quality = planned(pipe, policy, [t for g in groups for t in g],
                                        config.batch_size)
    curve_fab, curve = fab(curve_bits, units, dynamic), defaultdict(list)
    for k, value in enumerate(curve_fab):
        curve[k % len(groups[0])].append(float(value))
    examples = _examples(pipe, policy, groups[: config.example_scenes], config)
    plot_fab_by_richness(examples, dict(curve), out / "fab_by_richness.png",
                         f"{name}\nFAB per prompt alone (per_image)")
    simple, rich = examples[0]["captions"][0], examples[0]["captions"][-1]
    pair = requested_bits(pipe, policy, [simple, rich], config.batch_size)
    pair_fab = fab(pair, units, dynamic)
    plot_bits_heatmap([(f"simple: {simple!r}", pair[0], pair_fab[0]),
                       (f"rich: {rich!r}", pair[1], pair_fab[1])], dynamic, options,
                      out / "bits_per_step.png")
    numbers = _numbers(config, bits, units, dynamic, options, curve, examples, pair)
    numbers["direction"] = _direction(policy, units, dynamic, heldout_quality, curve_quality,
                                      len(groups[0]), out / "q2b_direction.png", name)
    numbers["s1"] = {"fab_max_mode": {str(k): v for k, v in by_size.items()},
                     "fab_per_image": per_image, "prompts": len(bits)}
    (out / "figures.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def _direction(policy, units, dynamic, heldout, series, levels, path, name) -> dict:
    """Q2B's FAB against predicted quality, beside the held-out prompts' predicted qualities
    (``heldout``) and those of each richness level (``series``: the scenes' captions, ``levels``
    a scene): ``q2b_direction.png`` and its numbers."""
    by_level = {k: series[k::levels] for k in range(levels)}
    low, high = float(heldout.min()), float(heldout.max())
    pad = max(0.25 * (high - low), 0.05)
    grid = np.linspace(low - pad, high + pad, 41)
    q2b = policy.modules.q2b
    curve = q2b_fab(q2b, units, dynamic, grid)
    span = q2b_fab(q2b, units, dynamic, np.array([low, high]))
    plot_q2b_direction(grid, curve, heldout, by_level, path,
                       f"{name}: the direction Q2B learned")
    slope = float(span[1] - span[0])
    return {"quality_grid": grid.tolist(), "fab_at_quality": curve.tolist(),
            "heldout_quality": {"min": low, "max": high, "mean": float(heldout.mean()),
                                "std": float(heldout.std())},
            "fab_at_heldout_min_and_max_quality": span.tolist(),
            "more_bits_for": ("higher predicted quality" if slope > 0 else
                              "lower predicted quality" if slope < 0 else "neither"),
            "quality_by_level_mean": {str(k): float(v.mean()) for k, v in by_level.items()},
            "quality_by_level_std": {str(k): float(v.std()) for k, v in by_level.items()}}


def _numbers(config, bits, units, dynamic, options, curve, examples, pair) -> dict:
    shares = {str(b): float((bits == b).mean()) for b in options}
    return {
        "config": asdict(config), "options": options,
        "s3": {"prompts": len(bits), "share_of_each_option": shares,
               "fab_mean": float(fab(bits, units, dynamic).mean())},
        "s4": {"fab_by_level_mean": {str(k): float(np.mean(v)) for k, v in sorted(curve.items())},
               "fab_by_level_std": {str(k): float(np.std(v)) for k, v in sorted(curve.items())},
               "scenes": len(curve[0]),
               "examples": [{"captions": e["captions"], "fab": e["fab"]} for e in examples]},
        "heatmap": {"simple_fab": float(fab(pair[:1], units, dynamic)[0]),
                    "rich_fab": float(fab(pair[1:], units, dynamic)[0])},
    }
