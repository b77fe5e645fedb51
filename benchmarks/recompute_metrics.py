"""Recompute evaluations' metrics.json (and metrics.md) from their features.safetensors, after a
metric's estimator changed: no images and no model needed.

    python benchmarks/recompute_metrics.py runs/ys/eval_fp runs/ys/eval_qd_w4a8 ...
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from qlip.evaluation.harness import recompute_metrics

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for folder in tqdm(sys.argv[1:], desc="recomputing", unit="run"):
        metrics = recompute_metrics(folder)
        tqdm.write(f"{folder}: kid={metrics.get('kid')} kid_vs_reference="
                   f"{metrics.get('kid_vs_reference')}")
