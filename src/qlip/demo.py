"""`qlip demo`: the main job on the embedded reference world. Quantize the reference model (RTN
W8A8 and W4A8), generate prompts of rising richness in FP and quantized, print a table (prompt,
richness, FAB, alignment, quality) and write an image grid."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SETTINGS = [("FP", None, None), ("RTN W8A8", 8, 8), ("RTN W4A8", 4, 8)]


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded reference world")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=2, help="scenes, each described at every richness")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=run_demo)


def rising_prompts(num_scenes: int, seed: int) -> list:
    """Each scene described at every richness level, from a bare noun to a full description
    (scenes of two or more objects show the levels best)."""
    from .world.domain import richness_series

    return richness_series(num_scenes, seed, min_objects=2)


@dataclass
class Judge:
    """Alignment and quality (GIQA percentile among real renders) from the reference evaluator."""

    evaluator: object
    giqa: object
    real_scores: np.ndarray

    @classmethod
    def build(cls, device: str, size: int, seed: int) -> Judge:
        from .metrics import GMMGIQA
        from .world.domain import render_batch, training_prompts
        from .world.evaluator import load_evaluator

        evaluator = load_evaluator(device)
        scenes = [p.scene for p in training_prompts(512, seed + 1)]
        real = render_batch(scenes, size, device, torch.Generator(device).manual_seed(seed))
        features = evaluator.global_features(real).cpu()
        giqa = GMMGIQA().fit(features)
        return cls(evaluator, giqa, np.asarray(giqa.score(features)))

    def judge(self, images: torch.Tensor, prompts: list) -> tuple[np.ndarray, np.ndarray]:
        from .metrics import alignment, rank_normalize

        predictions = self.evaluator.predict(images)
        aligned = alignment(prompts, predictions).scores
        scores = self.giqa.score(self.evaluator.global_features(images).cpu())
        return aligned, np.asarray(rank_normalize(scores, self.real_scores))


def _to_tensor(images) -> torch.Tensor:
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def run_demo(args) -> int:
    from .cli_args import device_name
    from .evaluation.report import save_grid
    from .nn import QuantConfig
    from .pipeline import CalibrationConfig, GenerationConfig, QuantizeJob, generate, load_pipeline
    from .pipeline.quantize import quantize_pipeline
    from .world.domain import training_prompts

    device = device_name(args.device)
    base = load_pipeline("reference", device)
    prompts = rising_prompts(args.scenes, args.seed)
    texts = [p.text for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    gen = GenerationConfig(steps=args.steps, guidance=args.guidance, batch_size=len(prompts))
    calib = [p.text for p in training_prompts(8, args.seed + 2)]
    out = Path(args.out)
    judge = None
    rows, tiles = [], []
    for label, wbits, abits in SETTINGS:
        start = time.perf_counter()
        pipe = copy.deepcopy(base)
        if wbits is not None:
            job = QuantizeJob(
                quant=QuantConfig(wbits=wbits, abits=abits),
                calibration=CalibrationConfig(num_prompts=8, num_inference_steps=args.steps,
                                              num_kept_steps=5, guidance=args.guidance),
                base_model="reference",
            )
            print(f"quantizing the reference model: {label}")
            quantize_pipeline(pipe, calib, job, out / label.split()[-1].lower(),
                              calibration_cache=out / "calibration.safetensors")
        result = generate(pipe, texts, seeds, config=gen)
        print(f"{label}: quantized (if asked) and generated {len(texts)} images in "
              f"{time.perf_counter() - start:.0f} s")
        images = _to_tensor(result.images)
        judge = judge or Judge.build(device, images.shape[-1], args.seed)
        aligned, quality = judge.judge(images, prompts)
        tiles.append(images)
        rows += [(label, p, r, a, q) for p, r, a, q in zip(prompts, result.reports, aligned, quality)]
    save_grid(torch.cat(tiles), out / "grid.png", columns=len(prompts))
    _print_table(rows)
    print(f"\ngrid: rows {', '.join(s[0] for s in SETTINGS)}; columns the prompts above, in order"
          f" -> {out / 'grid.png'}")
    return 0


def _print_table(rows) -> None:
    print(f"\n{'setting':<9} {'rich':>4} {'FAB':>6} {'BitOPs(T)':>10} {'align':>6} {'quality':>7}  prompt")
    for label, prompt, report, aligned, quality in rows:
        print(f"{label:<9} {prompt.richness:>4} {report.fab:6.2f} {report.bitops_t:10.4f} "
              f"{aligned:6.2f} {quality:7.2f}  {prompt.text[:80]}")
    print("align: fraction of the prompt's attributes the evaluator finds; quality: GIQA "
          "percentile among real renders (0-1)")
