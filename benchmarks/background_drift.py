"""How often a quantized run draws another background than FP for the same prompt and seed.

Reads the images of `qlip eval` folders (same prompts and seeds), classifies each image's
background as the nearest of the reference world's background colours by the median of its
border pixels, and prints, per run, the share of images whose background differs from the FP
run's and the count of each background:

    python benchmarks/background_drift.py OUT/fp OUT/eval_rtn_w4a8 OUT/eval_qd_w4a8 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from qlip.world.domain import BACKGROUNDS

BORDER = 3  # pixels: objects never reach the image border in this domain's layouts


def backgrounds(run: Path) -> np.ndarray:
    """Index into BACKGROUNDS of every image of an eval folder, in image order."""
    palette = np.array(list(BACKGROUNDS.values()), dtype=np.float64)  # [4, 3]
    found = []
    for path in sorted((run / "images").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)  # [H, W, 3]
        border = np.concatenate([image[:BORDER].reshape(-1, 3), image[-BORDER:].reshape(-1, 3),
                                 image[:, :BORDER].reshape(-1, 3)])
        found.append(int(np.argmin(((palette - np.median(border, 0)) ** 2).sum(1))))
    if not found:
        raise SystemExit(f"{run} holds no images/*.png: pass folders written by `qlip eval`")
    return np.array(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp", type=Path, help="the FP eval folder")
    parser.add_argument("runs", type=Path, nargs="+", help="eval folders to compare with it")
    args = parser.parse_args()
    reference = backgrounds(args.fp)
    names = list(BACKGROUNDS)
    for run in [args.fp, *args.runs]:
        found = backgrounds(run)
        if len(found) != len(reference):
            raise SystemExit(f"{run} has {len(found)} images, {args.fp} {len(reference)}")
        counts = ", ".join(f"{n} {int((found == i).sum())}" for i, n in enumerate(names))
        print(f"{run.name}: background changed {np.mean(found != reference):.1%} ({counts})")


if __name__ == "__main__":
    main()
