"""metrics.md tables and image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLUMNS = [
    ("fid", "FID", ".2f"), ("kid", "KID", ".4f"), ("sfid", "sFID", ".2f"),
    ("fid_fidelity", "FID (fidelity feats)", ".2f"), ("clip_score", "CLIP", ".4f"),
    ("alignment", "align", ".3f"), ("giqa", "GIQA", ".1f"), ("fab", "FAB", ".2f"),
    ("weighted_bits", "wbits", ".2f"), ("bitops_t", "BitOPs(T)", ".4f"),
    ("fid_vs_reference", "FID to ref", ".2f"), ("kid_vs_reference", "KID to ref", ".4f"),
    ("psnr_vs_reference", "PSNR to ref", ".2f"),
    ("perceptual_vs_reference", "perceptual to ref", ".4f"),
    ("image_mse_vs_reference", "MSE vs ref", ".4f"), ("num_images", "N", "d"),
]
CONSTANT = {"fab", "weighted_bits", "bitops_t", "num_images"}  # no interval shown


def _cell(value, fmt: str, bounds=None) -> str:
    if value is None:
        return "–"
    if not bounds or bounds[0] is None or bounds[0] == bounds[1]:
        return format(value, fmt)
    return f"{value:{fmt}} [{bounds[0]:{fmt}}, {bounds[1]:{fmt}}]"


def _row_cell(row: dict, key: str, fmt: str) -> str:
    bounds = None if key in CONSTANT else row.get("intervals", {}).get(key)
    return _cell(row.get(key), fmt, bounds)


def table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table with a column per metric present in any row; a metric with an
    interval reads "estimate [low, high]" (95% bootstrap over images)."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for _, r in rows)]
    head = "| run | " + " | ".join(c[1] for c in present) + " |"
    rule = "|---|" + "---:|" * len(present)
    body = ["| " + name + " | " + " | ".join(_row_cell(r, k, f) for k, _, f in present) + " |"
            for name, r in rows]
    return "\n".join([head, rule, *body])


def write_markdown(metrics: dict, path: Path) -> None:
    label = metrics.get("label") or "run"
    lines = [f"# {label}", "", table([(label, metrics)]), ""]
    if metrics.get("fid_floor") is not None:
        floor = _row_cell(metrics, "fid_floor", ".2f")
        lines += [f"FID floor (two independent sets of real renders): {floor}", ""]
    if metrics.get("by_richness"):
        lines += ["## By prompt richness", "",
                  table([(f"richness {k}", v) for k, v in metrics["by_richness"].items()]), ""]
    if metrics.get("by_objects"):
        lines += ["## By objects in the scene", "",
                  table([(f"{k} object(s)", v) for k, v in metrics["by_objects"].items()]), ""]
    for note in metrics.get("notes", []):
        lines.append(f"- {note}")
    path.write_text("\n".join(lines) + "\n")


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Images [N, 3, H, W] in [0, 1] as a grid PNG, row by row (the prompts are in generated.jsonl)."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = tile
    Image.fromarray(grid).save(path)


def _delta(a, b):
    return None if a is None or b is None else b - a


def damage_table(fp: dict, quantized: dict, name: str) -> str:
    """Per richness level: FP quality and what quantization changes (FID, alignment, image distance)."""
    head = ("| richness | N | FP GIQA | FP CLIP | FP align | FP FID | "
            f"{name} FID | ΔFID | Δalign | MSE vs FP |")
    lines = [head, "|---|" + "---:|" * 9]
    for level, f in fp.get("by_richness", {}).items():
        q = quantized.get("by_richness", {}).get(level, {})
        cells = [f.get("num_images"), f.get("giqa"), f.get("clip_score"), f.get("alignment"),
                 f.get("fid"), q.get("fid"), _delta(f.get("fid"), q.get("fid")),
                 _delta(f.get("alignment"), q.get("alignment")), q.get("image_mse_vs_reference")]
        fmts = ["d", ".1f", ".4f", ".3f", ".2f", ".2f", "+.2f", "+.3f", ".4f"]
        lines.append(f"| {level} | " + " | ".join(_cell(c, f) for c, f in zip(cells, fmts)) + " |")
    return "\n".join(lines)


def summarize(run_dirs: list[Path]) -> str:
    """One table over several eval folders, then the per-richness damage of each against the
    first (the FP run)."""
    import json

    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    lines = [table([(r.get("label") or Path(d).name, r) for d, r in zip(run_dirs, runs)]), ""]
    floor = runs[0].get("fid_floor")
    if floor is not None:
        lines += [f"FID floor (two independent sets of real renders): {floor:.2f}", ""]
    for run in runs[1:]:
        lines += [f"### {run.get('label')} against {runs[0].get('label')}, by richness", "",
                  damage_table(runs[0], run, run.get("label") or "quantized"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(summarize([Path(p) for p in sys.argv[1:]]))
