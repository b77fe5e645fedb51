"""Summary of a `benchmarks/yardstick_eval.sh` run: the table with 95% intervals, the paired
comparisons of interest, the calibration-seed spread, a side-by-side grid, and OUT/export/*.tar
(everything the docs need, in files of at most 15 MB).

    python benchmarks/yardstick_summary.py OUT [DEVICE] > OUT/summary.md
    PAIRS="qd_w4a16:qd_w4a8,fp:rtn_w8a5" python benchmarks/yardstick_summary.py OUT  # some pairs
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from qlip.evaluation.compare import (
    CompareConfig,
    compare_runs,
    comparison_json,
    comparison_markdown,
)
from qlip.evaluation.report import save_grid
from qlip.evaluation.run_features import FEATURES_FILE
from qlip.evaluation.store import ImageStore

ROWS = ["fp", *[f"qd_w4a{a}" for a in (16, 8, 6, 5, 4)], *[f"rtn_w8a{a}" for a in (16, 8, 6, 5, 4)],
        "qd_w4a8_s1", "qd_w4a8_s2"]
COLUMNS = [("fid", ".1f"), ("kid", ".0f"), ("sfid", ".2f"), ("clip_score", ".4f"),
           ("alignment", ".3f"), ("fid_fidelity", ".1f"), ("fid_vs_reference", ".1f"),
           ("kid_vs_reference", ".1f"), ("fid_fidelity_vs_reference", ".3f"),
           ("psnr_vs_reference", ".2f"),
           ("perceptual_vs_reference", ".4f"), ("image_mse_vs_reference", ".4f")]
PAIRS = [("qd_w4a16", "qd_w4a8"), ("qd_w4a8", "qd_w4a6"), ("qd_w4a6", "qd_w4a5"),
         ("qd_w4a5", "qd_w4a4"), ("qd_w4a16", "qd_w4a5"), ("fp", "qd_w4a16"),
         ("rtn_w8a16", "rtn_w8a8"), ("rtn_w8a8", "rtn_w8a6"), ("rtn_w8a6", "rtn_w8a5"),
         ("rtn_w8a5", "rtn_w8a4"), ("fp", "rtn_w8a5"), ("fp", "rtn_w8a16"),
         ("qd_w4a8", "qd_w4a8_s1"), ("qd_w4a8", "qd_w4a8_s2")]
if os.environ.get("PAIRS"):  # e.g. PAIRS="qd_w4a16:qd_w4a8,fp:rtn_w8a5": only these comparisons
    PAIRS = [tuple(p.split(":")) for p in os.environ["PAIRS"].split(",")]
SEEDS = ["qd_w4a8", "qd_w4a8_s1", "qd_w4a8_s2"]
EXPORT_LIMIT = 15 * 2**20
RESAMPLES = int(os.environ.get("COMPARE_RESAMPLES", "500"))  # paired bootstrap resamples


def _cell(metrics: dict, key: str, fmt: str) -> str:
    value, bounds = metrics.get(key), metrics.get("intervals", {}).get(key)
    if value is None:
        return "–"
    if not bounds or bounds[0] is None:
        return format(value, fmt)
    return f"{value:{fmt}} [{bounds[0]:{fmt}}, {bounds[1]:{fmt}}]"


def table(out: Path, rows: list[str]) -> str:
    runs = {r: json.loads((out / f"eval_{r}" / "metrics.json").read_text()) for r in rows}
    keys = [(k, f) for k, f in COLUMNS if any(m.get(k) is not None for m in runs.values())]
    lines = ["| run | " + " | ".join(k for k, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    for r, m in runs.items():
        lines.append(f"| {m.get('label') or r} | " + " | ".join(_cell(m, k, f) for k, f in keys)
                     + " |")
    floor = runs[rows[0]].get("fid_floor")
    if floor is not None:
        lines += ["", f"FID floor (real vs real): {_cell(runs[rows[0]], 'fid_floor', '.1f')}"]
    return "\n".join(lines)


def seed_spread(out: Path) -> str:
    runs = [json.loads((out / f"eval_{r}" / "metrics.json").read_text()) for r in SEEDS]
    lines = ["| metric | seed 0 | seed 1 | seed 2 | seed std | image-sampling half-width (seed 0) |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, fmt in COLUMNS:
        values = [r.get(key) for r in runs]
        if any(v is None for v in values):
            continue
        low, high = runs[0]["intervals"][key]
        lines.append(f"| {key} | " + " | ".join(format(v, fmt) for v in values)
                     + f" | {np.std(values, ddof=1):.4g} | {(high - low) / 2:.4g} |")
    return "\n".join(lines)


def _first_tiles(grid_png: Path, count: int, columns: int = 8) -> torch.Tensor:
    """The first ``count`` images of an eval's grid.png (64 images, ``columns`` a row, 2-pixel
    gaps: `qlip eval`'s layout), [count, 3, H, W] in [0, 1]."""
    pixels = np.asarray(Image.open(grid_png).convert("RGB"), dtype=np.float32) / 255
    size = pixels.shape[1] // columns - 2
    tiles = [pixels[r * (size + 2):r * (size + 2) + size, c * (size + 2):c * (size + 2) + size]
             for r, c in (divmod(i, columns) for i in range(count))]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)


def grid(out: Path, rows: list[str], count: int = 16) -> Path:
    """Rows = runs (in ROWS order), columns = the first ``count`` prompts. Where a run's images
    were not brought back (records and features only), its tiles come from its grid.png."""
    stores = [ImageStore(out / f"eval_{r}") for r in rows]
    path = out / "grid_runs.png"
    if all(store.records and (out / f"eval_{r}" / "images").is_dir()
           for r, store in zip(rows, stores)):
        count = min(count, len(stores[0].records))
        images = [store.load_images(count) for store in stores]
    else:
        count = min(count, 8)  # grid.png holds the first 64; rows of 8 keep the figure legible
        images = [_first_tiles(out / f"eval_{r}" / "grid.png", count) for r in rows]
    save_grid(torch.cat(images), path, columns=count)
    return path


def _slim_features(out: Path, row: str, target: Path) -> Path:
    """A run's features without the real and reference sets (the FP run's real set and
    generated set: identical in every run), to keep the export small."""
    tensors = load_file(str(out / f"eval_{row}" / FEATURES_FILE))
    keep = {k: v for k, v in tensors.items()
            if row == "fp" or not k.startswith(("real.", "reference."))}
    path = target / f"{row}.{FEATURES_FILE}"
    save_file(keep, str(path))
    return path


def export(out: Path, rows: list[str], extra: list[Path]) -> list[Path]:
    folder = out / "export"
    folder.mkdir(exist_ok=True)
    small = [out / f"eval_{r}" / name for r in rows
             for name in ("metrics.json", "metrics.md", "generated.jsonl")
             if (out / f"eval_{r}" / name).is_file()]
    small += [p for p in extra if p.is_file()] + sorted((out / "logs").glob("*.txt"))
    tars = [folder / "metrics.tar"]
    with tarfile.open(tars[0], "w") as handle:
        for path in small:
            handle.add(path, arcname=str(path.relative_to(out)))
    parts: list[list[Path]] = [[]]
    size = 0
    for row in rows:
        path = _slim_features(out, row, folder)
        if size + path.stat().st_size > EXPORT_LIMIT and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(path)
        size += path.stat().st_size
    for index, paths in enumerate(parts):
        tars.append(folder / f"features_{index}.tar")
        with tarfile.open(tars[-1], "w") as handle:
            for path in paths:
                handle.add(path, arcname=path.name)
        for path in paths:
            path.unlink()
    return tars


def finished_rows(out: Path, order: list[str]) -> tuple[list[str], int]:
    """The runs of ``order`` whose eval finished, FP first, and the number of images; exits with
    advice when the FP eval is missing."""
    rows = [r for r in order if (out / f"eval_{r}" / "metrics.json").is_file()]
    if not rows or rows[0] != "fp":
        sys.exit(f"no FP eval in {out}: run PHASE=quantize and PHASE=eval first")
    return rows, json.loads((out / "eval_fp/metrics.json").read_text())["num_images"]


def main(out: Path, device: str = "cpu") -> None:
    rows, count = finished_rows(out, ROWS)
    text = [f"# Yardstick run ({count} images)\n", table(out, rows),
            "\n## Paired comparisons (A − B, 95% paired bootstrap)\n"]
    comparisons = {}
    for a, b in PAIRS:
        if a in rows and b in rows:
            config = CompareConfig(str(out / f"eval_{a}"), str(out / f"eval_{b}"),
                                   resamples=RESAMPLES, device=device)
            result = compare_runs(config)
            comparisons[f"{a} vs {b}"] = comparison_json(result)
            text.append(f"### {a} vs {b}\n\n{comparison_markdown(result)}\n")
    if all(r in rows for r in SEEDS):
        text.append("## Calibration seeds (Q-Diffusion W4A8)\n\n" + seed_spread(out) + "\n")
    finish(out, rows, text, comparisons)


def finish(out: Path, rows: list[str], text: list[str], comparisons: dict) -> None:
    """Write comparisons.json and summary.md, the grid and the export tars; print the summary."""
    (out / "comparisons.json").write_text(json.dumps(comparisons, indent=2))
    (out / "summary.md").write_text("\n".join(text) + "\n")
    extra = [grid(out, rows), out / "comparisons.json", out / "timings.txt", out / "summary.md"]
    tars = export(out, rows, extra)
    print("\n".join(text))
    print("exported: " + ", ".join(f"{t.name} ({t.stat().st_size / 2**20:.1f} MB)" for t in tars))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
