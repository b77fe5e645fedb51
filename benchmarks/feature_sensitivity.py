"""Which feature spaces see quantization damage? FID between N fresh renders and their degraded
copies (noise, blur, colour cast, posterization, VAE passes) in the evaluator's global, spatial
and fidelity features, plus the floor (two independent render sets); JSON and a PNG plot.

    python benchmarks/feature_sensitivity.py OUT_DIR [N=1000]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qlip.evaluation.measures import WorldExtractor  # noqa: E402
from qlip.evaluation.sensitivity import STRENGTHS, is_monotone, sensitivity  # noqa: E402
from qlip.metrics import fid_from_features  # noqa: E402
from qlip.world.domain import render_batch, sample_scene  # noqa: E402
from qlip.world.evaluator import load_evaluator  # noqa: E402
from qlip.world.reference import load_reference_pipeline  # noqa: E402


def renders(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return render_batch(scenes, 64, "cpu", torch.Generator().manual_seed(seed)).cpu()


def vae_reconstruct(vae):
    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        out = [((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
               for x in images.split(100)]
        return torch.cat(out)
    return run


def main(out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    extractor = WorldExtractor(load_evaluator("cpu"))
    spaces = {"global": extractor.global_features, "spatial": extractor.spatial_features,
              "fidelity": extractor.fidelity_features}
    images, other = renders(n, 1), renders(n, 2)
    reconstruct = vae_reconstruct(load_reference_pipeline("cpu").vae)
    table = sensitivity(spaces, images, reconstruct=reconstruct)
    floor = {k: fid_from_features(fn(images).double(), fn(other).double()) for k, fn in spaces.items()}
    result = {"num_images": n, "machine": "CPU (2 cores)", "strengths": STRENGTHS,
              "fid": table, "floor": floor,
              "monotone": {s: {k: is_monotone(v) for k, v in t.items()} for s, t in table.items()}}
    (out / "feature_sensitivity.json").write_text(json.dumps(result, indent=2))
    fig, axes = plt.subplots(1, len(STRENGTHS), figsize=(4 * len(STRENGTHS), 3.4))
    for ax, kind in zip(axes, STRENGTHS):
        for space in spaces:
            ax.plot(range(1, 5), np.array(table[space][kind]) / floor[space], "o-", label=space)
        ax.set_yscale("log")
        ax.set_title(f"{kind} {STRENGTHS[kind]}")
        ax.set_xlabel("strength")
    axes[0].set_ylabel("FID(clean, degraded) / floor")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "feature_sensitivity.png", dpi=90)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
