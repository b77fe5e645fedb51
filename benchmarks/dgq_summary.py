"""Summary of a `benchmarks/dgq_eval.sh` run: the table with 95% intervals (DGQ g = 1, 8, 16 and
Q-Diffusion at every setting), the paired comparisons that decide the issue's questions, the
calibration wall times, a grid, and OUT/export/*.tar (what the docs need, in files <= 15 MB).

    python benchmarks/dgq_summary.py OUT [DEVICE]   # writes OUT/summary.md, prints it
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from yardstick_summary import finish, finished_rows, table  # benchmarks/ is the script's folder

from qlip.evaluation.compare import (
    CompareConfig,
    compare_runs,
    comparison_json,
    comparison_markdown,
)

SETTINGS = [(8, 8), (4, 8), (8, 6), (4, 6), (4, 5), (4, 4)]
GROUPS = (1, 8, 16)
ROWS = ["fp"] + [name for w, a in SETTINGS
                 for name in (f"qd_w{w}a{a}", *(f"dgq_w{w}a{a}_g{g}" for g in GROUPS))]
ROWS += ["qlip_dgq_w4_g16"]  # the later QLIP-on-DGQ phase, when it has run
RESAMPLES = int(os.environ.get("COMPARE_RESAMPLES", "500"))
# every DGQ row against Q-Diffusion at its setting; the grouping's gain (g vs 1); and the
# issue's target: DGQ W4A4 against Q-Diffusion W4A5 (the decision rule of docs/metrics.md)
PAIRS = ([("dgq_w4a4_g16", "qd_w4a5"), ("dgq_w4a4_g8", "qd_w4a5")]
         + [(f"dgq_w{w}a{a}_g{g}", f"qd_w{w}a{a}") for w, a in SETTINGS for g in GROUPS]
         + [(f"dgq_w{w}a{a}_g{g}", f"dgq_w{w}a{a}_g1") for w, a in ((8, 8), (4, 6), (4, 4))
            for g in (8, 16)]
         + [("qlip_dgq_w4_g16", "dgq_w4a4_g16")])
DECIDING = ("alignment", "clip_score", "psnr_vs_reference", "perceptual_vs_reference",
            "fid_fidelity_vs_reference")


def calibration_times(out: Path) -> str:
    """The `quantize ...` lines of timings.txt: one per model (the last complete run)."""
    path = out / "timings.txt"
    if not path.is_file():
        return "(no timings.txt)"
    times: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"quantize (\S+): (\d+) s \(exit (\d+)\)", line)
        if match:
            times.setdefault(match[1], []).append(f"{match[2]} s" + (
                "" if match[3] == "0" else f" (cut/failed, exit {match[3]})"))
    lines = ["| model | what it calibrates | wall time(s), in order |", "|---|---|---|"]
    for name, runs in sorted(times.items()):
        what = ("reconstruction + activations" if not name.startswith("dgq_") or
                name.endswith("_g16") else "activations only (weights reused)")
        lines.append(f"| {name} | {what} | {', '.join(runs)} |")
    return "\n".join(lines)


def compared(out: Path, a: str, b: str, device: str) -> dict:
    """``qlip compare`` of two evals, kept in OUT/comparisons/ (a rerun after a cut resumes)."""
    path = out / "comparisons" / f"{a}_vs_{b}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = CompareConfig(str(out / f"eval_{a}"), str(out / f"eval_{b}"), resamples=RESAMPLES,
                           device=device)
    result = compare_runs(config)
    done = {"json": comparison_json(result), "markdown": comparison_markdown(result)}
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(done))
    partial.replace(path)
    return done


def verdicts(result: dict) -> str:
    """The deciding metrics of one comparison on one line."""
    metrics = result["metrics"]
    return "; ".join(f"{k}: {metrics[k]['verdict']}" for k in DECIDING if k in metrics)


def main(out: Path, device: str = "cpu") -> None:
    rows, count = finished_rows(out, ROWS)
    text = [f"# DGQ on the reference world ({count} images)\n", table(out, rows),
            "\n## Calibration wall times\n", calibration_times(out),
            "\n## Paired comparisons (A − B, 95% paired bootstrap)\n"]
    comparisons, short = {}, ["| A | B | verdicts |", "|---|---|---|"]
    (out / "comparisons").mkdir(exist_ok=True)
    for a, b in PAIRS:
        if a in rows and b in rows:
            result = compared(out, a, b, device)
            comparisons[f"{a} vs {b}"] = result["json"]
            short.append(f"| {a} | {b} | {verdicts(result['json'])} |")
            text.append(f"### {a} vs {b}\n\n{result['markdown']}\n")
    text[4:4] = ["\n## Verdicts on the deciding metrics\n", "\n".join(short)]
    finish(out, rows, text, comparisons)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
