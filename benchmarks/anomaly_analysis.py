"""Why does a coarse-activation run read better than FP (RTN W8A5: FID 155 vs 229)? Measures the
candidate causes on eval folders of the same held-out prompts and seeds, and writes a grid:

- FID split into its mean term ‖μ_g − μ_r‖² and covariance term, and the generated spread tr Σ_g
  against the real spread tr Σ_r (evaluator global features, from features.safetensors);
- open attributes: for prompts that leave the background open, how the backgrounds drawn are
  distributed (the real renders draw them uniformly) and their entropy;
- the VAE's right-edge streak: horizontal gradient energy in the last columns against the
  interior, on background pixels;
- residual noise: pixel std on the background (where the prompt's render is background);
- per richness level: FID (from metrics.json).

    python benchmarks/anomaly_analysis.py OUT_DIR FP_EVAL RUN_EVAL... [--images N] > OUT_DIR/anomaly.md
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qlip.evaluation.cli import select_prompts
from qlip.evaluation.measures import REAL_SEED, _render_all
from qlip.evaluation.report import save_grid
from qlip.evaluation.run_features import load_run_features
from qlip.evaluation.store import ImageStore
from qlip.world.domain import BACKGROUNDS

PALETTE = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255  # [4, 3]


def fid_parts(real: np.ndarray, gen: np.ndarray) -> dict:
    from scipy.linalg import sqrtm

    cov_r, cov_g = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    root = sqrtm(cov_r @ cov_g).real
    return {"mean_term": float(((real.mean(0) - gen.mean(0)) ** 2).sum()),
            "cov_term": float(np.trace(cov_r + cov_g - 2 * root)),
            "trace_gen": float(np.trace(cov_g)), "trace_real": float(np.trace(cov_r))}


def background_index(images: torch.Tensor) -> torch.Tensor:
    """Nearest palette background of each image by the median of its top/bottom/left border."""
    border = torch.cat([images[:, :, :3].flatten(2), images[:, :, -3:].flatten(2),
                        images[:, :, :, :3].flatten(2)], 2).median(2).values  # [N, 3]
    return ((border[:, None] - PALETTE[None]) ** 2).sum(-1).argmin(1)


def entropy(indices: torch.Tensor) -> float:
    p = torch.bincount(indices, minlength=len(PALETTE)).double() / len(indices)
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def background_mask(real: torch.Tensor) -> torch.Tensor:
    """[N, H, W] True where the render shows only background (3x3 neighbourhood)."""
    colour = PALETTE[background_index(real)][:, :, None, None]
    same = ((real - colour).abs().amax(1) < 1e-3).float()[:, None]
    return torch.nn.functional.max_pool2d(1 - same, 3, 1, 1)[:, 0] == 0


def streak_and_noise(images: torch.Tensor, mask: torch.Tensor) -> dict:
    grad = (images[..., 1:] - images[..., :-1]).abs().mean(1)  # [N, H, W-1]
    m = mask[..., 1:] & mask[..., :-1]
    column = (grad * m).sum((0, 1)) / m.sum((0, 1)).clamp(min=1)  # [W-1]
    pixels = images.permute(1, 0, 2, 3)[:, mask]  # [3, P]
    colour = images.flatten(2).median(2).values  # per-image background estimate
    residual = (images - colour[:, :, None, None]).abs().mean(1)[mask]
    return {"edge_gradient_last4": float(column[-4:].mean()),
            "interior_gradient": float(column[8:-8].mean()),
            "background_pixel_std": float(pixels.std(1).mean()),
            "background_residual": float(residual.mean())}


def main(out: Path, fp: Path, runs: list[Path], images: int | None = None) -> None:
    """``images``: measure the image-based columns on the first ``images`` images only (folders
    brought back from the GPU with a sample of their images); FID and its parts always use every
    image's features."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(ImageStore(fp).records) if images is None else images
    prompts = select_prompts("heldout", n, world=True)
    real = _render_all(prompts, 64, REAL_SEED, "cpu")
    mask = background_mask(real)
    open_bg = torch.tensor([p.world_prompt.background is None for p in prompts])
    folders = [fp, *runs]
    report = {"num_images": n, "open_background_prompts": int(open_bg.sum()), "runs": {}}
    report["runs"]["real renders"] = {**streak_and_noise(real, mask),
                                      "bg_entropy_open": entropy(background_index(real[open_bg]))}
    images = {}
    for folder in folders:
        run = load_run_features(folder)
        images[folder] = ImageStore(folder).load_images(n)
        metrics = json.loads((folder / "metrics.json").read_text())
        idx = background_index(images[folder][open_bg])
        report["runs"][metrics.get("label") or folder.name] = {
            "fid": metrics["fid"],
            **fid_parts(run.features["real"]["global"], run.features["generated"]["global"]),
            **streak_and_noise(images[folder], mask),
            "bg_entropy_open": entropy(idx),
            "bg_counts_open": torch.bincount(idx, minlength=4).tolist(),
            "fid_by_richness": {k: v.get("fid") for k, v in metrics["by_richness"].items()}}
    chosen = torch.arange(min(n, 16))
    tiles = [real[chosen]] + [images[f][chosen] for f in folders]
    save_grid(torch.cat(tiles), out / "anomaly_grid.png", columns=len(chosen))
    (out / "anomaly.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("fp", type=Path)
    parser.add_argument("runs", type=Path, nargs="*")
    parser.add_argument("--images", type=int, help="image-based measures on the first N images")
    args = parser.parse_args()
    main(args.out, args.fp, args.runs, args.images)
