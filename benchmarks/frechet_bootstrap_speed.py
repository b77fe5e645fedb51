"""Time of the bootstrap Fréchet distance (qlip.metrics.bootstrap.bootstrap_frechet: 200
resamples at 2,000 images, the set metrics of every eval) with its Cholesky route against the
symmetric square root it replaced (eigh + eigvalsh per resample), on the CPU and, where there is
one, the GPU; at the feature sizes of the reference world's evaluator (192 fidelity, 256 global,
512 spatial for sFID). Both routes must give the same distances (the JSON records the largest
relative difference).

    python benchmarks/frechet_bootstrap_speed.py --out benchmarks/results/frechet_bootstrap.h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qlip.metrics import bootstrap as bs


def eigh_route(mean_a, cov_a, mean_b, cov_b):
    """The route before the Cholesky factor: Σ_a^½ by eigh, then eigvalsh."""
    root_a = bs._sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.transpose(1, 2)) / 2
    trace_root = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum(-1)
    return ((mean_a - mean_b).pow(2).sum(-1) + cov_a.diagonal(dim1=1, dim2=2).sum(-1)
            + cov_b.diagonal(dim1=1, dim2=2).sum(-1) - 2 * trace_root)


def run(device: str, dim: int, n: int, resamples: int, route) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.1 + 0.05
    counts = bs.resample_counts(n, resamples, seed=0)
    config = bs.BootstrapConfig(device=device)
    original = bs.frechet_batch
    bs.frechet_batch = route
    try:
        bs.bootstrap_frechet(a, b, counts[:2], config=config)  # warm-up (solver handles)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        values = bs.bootstrap_frechet(a, b, counts, config=config)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, values
    finally:
        bs.frechet_batch = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for dim in (192, 256, 512):
            old_s, old = run(device, dim, args.images, args.resamples, eigh_route)
            new_s, new = run(device, dim, args.images, args.resamples, bs.frechet_batch)
            rows.append({"device": device, "dim": dim, "eigh_route_s": old_s,
                         "cholesky_route_s": new_s, "speedup": old_s / new_s,
                         "max_rel_diff": float(((new - old).abs() / old.abs()).max())})
            print(rows[-1], flush=True)
    result = {"images": args.images, "resamples": args.resamples, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
