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
from qlip.evaluation.intervals import decide

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
         + [("qlip_dgq_w4_g16", f"dgq_w4a{a}_g16") for a in (4, 6, 8)])


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


METHODS = [("qd", "Q-Diffusion", "black"), ("g1", "DGQ g = 1", "tab:orange"),
           ("g8", "DGQ g = 8", "tab:blue"), ("g16", "DGQ g = 16", "tab:green")]


def _row(method: str, w: int, a: int) -> str:
    return f"qd_w{w}a{a}" if method == "qd" else f"dgq_w{w}a{a}_{method}"


def plot(out: Path, rows: list[str]) -> Path:
    """PSNR to FP and alignment against the activation bits, per method, W4 solid and W8
    dashed, with the 95% intervals as error bars, and QLIP on DGQ at its FAB where it has run:
    OUT/dgq_by_bits.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r: json.loads((out / f"eval_{r}" / "metrics.json").read_text()) for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "psnr_vs_reference", "PSNR to FP (dB), higher is better"),
                           (axes[1], "alignment", "alignment, higher is better")):
        for method, name, colour in METHODS:
            for w, style in ((4, "-"), (8, "--")):
                points = [(a, runs[_row(method, w, a)]) for ww, a in SETTINGS
                          if ww == w and _row(method, w, a) in runs]
                if not points:
                    continue
                bits = [a for a, _ in points]
                values = [m[key] for _, m in points]
                low = [v - m["intervals"][key][0] for v, (_, m) in zip(values, points)]
                high = [m["intervals"][key][1] - v for v, (_, m) in zip(values, points)]
                ax.errorbar(bits, values, yerr=[low, high], fmt=style + "o", color=colour,
                            capsize=3, markersize=4, label=f"{name} W{w}")
        if "qlip_dgq_w4_g16" in runs:  # QLIP's point at its FAB (mean bits per activation)
            m = runs["qlip_dgq_w4_g16"]
            v, (lo, hi) = m[key], m["intervals"][key]
            ax.errorbar([m["fab"]], [v], yerr=[[v - lo], [hi - v]], fmt="*", color="tab:red",
                        capsize=3, markersize=10, label="QLIP on DGQ g = 16 W4 (x: FAB)")
        if key == "alignment" and "fp" in runs:
            ax.axhline(runs["fp"][key], color="grey", linewidth=0.8, label="FP")
        ax.set_xlabel("activation bits")
        ax.set_ylabel(label)
        ax.set_xticks([4, 5, 6, 8])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    count = runs[rows[0]]["num_images"]
    fig.suptitle(f"DGQ and Q-Diffusion on the reference world: {count} held-out prompts, "
                 "95% bootstrap intervals")
    fig.tight_layout()
    path = out / "dgq_by_bits.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    """The decision rule's verdict and the deciding measures where A and B differ, on one line."""
    decision = decide({k: m["verdict"] for k, m in result["metrics"].items()})
    kept = {True: "**kept**", False: "not kept", None: "undecided"}[decision.kept]
    return (f"{kept} | {', '.join(decision.better) or '–'} | {', '.join(decision.worse) or '–'}")


def main(out: Path, device: str = "cpu") -> None:
    rows, count = finished_rows(out, ROWS)
    text = [f"# DGQ on the reference world ({count} images)\n", table(out, rows),
            "\n## Calibration wall times\n", calibration_times(out),
            "\n## Paired comparisons (A − B, 95% paired bootstrap)\n"]
    comparisons, short = {}, ["| A | B | A's quality against B | A better on | A worse on |",
                              "|---|---|---|---|---|"]
    (out / "comparisons").mkdir(exist_ok=True)
    for a, b in PAIRS:
        if a in rows and b in rows:
            result = compared(out, a, b, device)
            comparisons[f"{a} vs {b}"] = result["json"]
            short.append(f"| {a} | {b} | {verdicts(result['json'])} |")
            text.append(f"### {a} vs {b}\n\n{result['markdown']}\n")
    text[4:4] = ["\n## The decision rule (docs/metrics.md) on each pair\n", "\n".join(short)]
    text.append(f"![PSNR to FP and alignment by activation bits]({plot(out, rows).name})\n")
    finish(out, rows, text, comparisons)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
