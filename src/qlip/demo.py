"""`qlip demo`: QLIP on the embedded reference world, next to fixed bits. The reference model is
quantized once (RTN W8 with an activation bank {4, 6, 8}); a small QLIP A{4,6,8} is trained on
it (a few dozen prompts and iterations: it shows the mechanism, it is not a trained result;
cached in the model folder and reused while its inputs match); then prompts of rising richness
are generated in FP, at fixed A8 and A4, and with QLIP, each prompt at its own bits. Prints a
table (setting, richness, FAB, BitOPs, alignment, quality, prompt) and writes an image grid."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BANK = (4, 6, 8)
FIXED = (8, 4)
MODEL_DIR = "rtn_w8"


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="QLIP next to fixed bits on the embedded reference world")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=2, help="scenes, each described at every richness")
    p.add_argument("--qlip-prompts", type=int, default=48, help="prompts the small QLIP trains on")
    p.add_argument("--qlip-iters", type=int, default=40, help="Q2B iterations of the small QLIP")
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


def _quantized_model(base, folder: Path, args) -> None:
    """RTN W8 with the bank, in ``folder``; an earlier demo's model of the same settings is kept
    (so the small QLIP trained on it stays valid)."""
    from .nn import QuantConfig
    from .pipeline import CalibrationConfig, QuantizeJob
    from .pipeline.quantize import quantize_pipeline
    from .pipeline.saving import read_config
    from .world.domain import training_prompts

    job = QuantizeJob(
        quant=QuantConfig(wbits=8, abits=max(BANK), abits_options=BANK),
        calibration=CalibrationConfig(num_prompts=8, num_inference_steps=args.steps,
                                      num_kept_steps=5, guidance=args.guidance, seed=args.seed),
        base_model="reference")
    if (folder / "quant_config.json").is_file():
        meta = read_config(folder)
        wanted = json.loads(json.dumps([job.quant.to_dict(), job.method_config()]))
        if [meta["quant_config"], meta["method_config"]] == wanted:
            print(f"reusing the quantized model in {folder}")
            return
    print(f"quantizing the reference model: RTN W8, activation bank {BANK} -> {folder}")
    calib = [p.text for p in training_prompts(8, args.seed + 2)]
    quantize_pipeline(copy.deepcopy(base), calib, job, folder, progress=False)


def _train_small_qlip(folder: Path, args, device: str) -> dict:
    from .methods.qlip import Q2BConfig, Q2BTrainConfig, T2QConfig
    from .pipeline.qlip_data import FPRunConfig
    from .qlip_training import TrainQLIPConfig, train_qlip

    config = TrainQLIPConfig(
        quantized=str(folder), device=device, num_prompts=args.qlip_prompts,
        prompt_seed=args.seed + 3, exclude_heldout=False, q2b_prompts=8,
        sampling=FPRunConfig(steps=args.steps, guidance=args.guidance, chunk=16,
                             seed=args.seed),
        t2q=T2QConfig(iters=300, batch_size=32, lr=3e-3), t2q_holdout=0.25,
        q2b=Q2BConfig(bits=BANK, group_steps=5, high_steps=1),
        q2b_train=Q2BTrainConfig(iters=args.qlip_iters, batch_size=4, lr=0.05, lam=0.05,
                                 checkpoint_every=10),
        redo_stale=True, progress=False)
    print(f"training a small QLIP A{{{','.join(map(str, BANK))}}} on {args.qlip_prompts} prompts "
          f"and {args.qlip_iters} Q2B iterations (cached in {config.work}; reused while its "
          "inputs match). It shows the mechanism; it is not a trained result.")
    start = time.perf_counter()
    modules = train_qlip(config, log=lambda m: print(f"  {m}"))
    print(f"  QLIP ready in {time.perf_counter() - start:.0f} s")
    return modules.metrics


def _settings(base, folder: Path):
    """(label, pipeline, policy) per row: FP, the fixed bits, QLIP."""
    from .pipeline import load_for_sampling
    from .policies import FixedBits

    rows = [("FP", base, None)]
    for bits in FIXED:
        pipe = copy.deepcopy(base)
        load_for_sampling(pipe, folder, abits=bits)
        rows.append((f"W8A{bits}", pipe, FixedBits(bits)))
    pipe = copy.deepcopy(base)
    rows.append((f"W8 QLIP A{{{','.join(map(str, BANK))}}}", pipe, load_for_sampling(pipe, folder)))
    return rows


def run_demo(args) -> int:
    from .cli_args import device_name
    from .evaluation.report import save_grid
    from .pipeline import GenerationConfig, generate, load_pipeline

    device = device_name(args.device)
    out = Path(args.out)
    base = load_pipeline("reference", device)
    folder = out / MODEL_DIR
    _quantized_model(base, folder, args)
    metrics = _train_small_qlip(folder, args, device)
    prompts = rising_prompts(args.scenes, args.seed)
    texts, seeds = [p.text for p in prompts], [args.seed + i for i in range(len(prompts))]
    gen = GenerationConfig(steps=args.steps, guidance=args.guidance, batch_size=len(prompts),
                           batch_mode="per_image")
    judge, rows, tiles, settings = None, [], [], _settings(base, folder)
    for label, pipe, policy in settings:
        start = time.perf_counter()
        result = generate(pipe, texts, seeds, policy, gen, progress=False)
        print(f"{label}: generated {len(texts)} images in {time.perf_counter() - start:.0f} s")
        images = _to_tensor(result.images)
        judge = judge or Judge.build(device, images.shape[-1], args.seed)
        aligned, quality = judge.judge(images, prompts)
        tiles.append(images)
        rows += [(label, p, r, a, q) for p, r, a, q in zip(prompts, result.reports, aligned, quality)]
    save_grid(torch.cat(tiles), out / "grid.png", columns=len(prompts))
    _print_table(rows)
    t2q = metrics["t2q"]
    print(f"\nthe small QLIP's T2Q: held-out SROCC {t2q['srocc']:.2f}, PLCC {t2q['plcc']:.2f} on "
          f"{t2q['heldout_prompts']} prompts (label {t2q['label']})")
    print(f"grid: rows {', '.join(s[0] for s in settings)}; columns the prompts above, in order"
          f" -> {out / 'grid.png'}")
    return 0


def _print_table(rows) -> None:
    print(f"\n{'setting':<16} {'rich':>4} {'FAB':>6} {'BitOPs(T)':>10} {'align':>6} {'quality':>7}"
          "  prompt")
    for label, prompt, report, aligned, quality in rows:
        print(f"{label:<16} {prompt.richness:>4} {report.fab:6.2f} {report.bitops_t:10.4f} "
              f"{aligned:6.2f} {quality:7.2f}  {prompt.text[:80]}")
    print("FAB: mean activation bits over the quantized layers and steps (QLIP: each prompt its "
          "own); align: fraction of the prompt's attributes the evaluator finds; quality: GIQA "
          "percentile among real renders (0-1)")
