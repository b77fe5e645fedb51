"""Summary of a `benchmarks/qlip_first_result.sh` run: one table (FID, sFID, CLIP, alignment,
fidelity to FP with 95% intervals; FAB, BitOPs), T2Q's held-out SROCC/PLCC and each QLIP's
training record, the paired comparisons of each QLIP against its neighbouring fixed settings,
a grid, and OUT/export/*.tar (the figures included).

    python benchmarks/qlip_first_result_summary.py OUT [DEVICE]   # writes OUT/summary.md

The shell script passes SETS, FIXED and MTAG (its option sets, fixed bits and method tag).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from yardstick_summary import export, grid

from qlip.evaluation.compare import (
    CompareConfig,
    compare_runs,
    comparison_json,
    comparison_markdown,
)
from qlip.evaluation.report import table

# what the shell script ran (its SETS, FIXED and method tag; the defaults are its first result)
SETS = {s.replace(",", "-"): tuple(int(b) for b in s.split(","))
        for s in os.environ.get("SETS", "8,16,32 4,5,6").split()}
FIXED = [int(a) for a in os.environ.get("FIXED", "32 16 8 6 5 4").split()]
MTAG = os.environ.get("MTAG", "qd")
ROWS = ["fp", *[f"{MTAG}_w4a{a}" for a in FIXED], *[f"qlip_{s}" for s in SETS]]
RESAMPLES = int(os.environ.get("COMPARE_RESAMPLES", "500"))


def _pairs(rows: list[str]) -> list[tuple[str, str]]:
    """Each QLIP against every fixed setting of its option set."""
    return [(f"qlip_{s}", f"{MTAG}_w4a{a}") for s, options in SETS.items()
            for a in sorted(options, reverse=True)
            if f"qlip_{s}" in rows and f"{MTAG}_w4a{a}" in rows]


def t2q_table(out: Path) -> str:
    lines = ["| QLIP | label | T2Q SROCC | T2Q PLCC | held-out prompts | training prompts (levels) "
             "| Q2B iterations | Q2B mean bits (last tenth) | stage seconds |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for name in SETS:
        path = out / f"q_qlip_{name}" / "qlip.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())["metrics"]
        t2q, q2b, prompts = metrics["t2q"], metrics["q2b"], metrics["prompts"]
        lines.append(f"| A{{{name.replace('-', ',')}}} | {t2q['label']} | {t2q['srocc']:.3f} | "
                     f"{t2q['plcc']:.3f} | {t2q['heldout_prompts']} | {prompts['count']} "
                     f"({prompts.get('richness')}) | {q2b['iters']} | {q2b['fab']:.2f} | "
                     f"{metrics.get('seconds')} |")
    return "\n".join(lines)


def main(out: Path, device: str = "cpu") -> None:
    rows = [r for r in ROWS if (out / f"eval_{r}" / "metrics.json").is_file()]
    if not rows or rows[0] != "fp":
        sys.exit(f"no FP eval in {out}: run PHASE=quantize and PHASE=eval first")
    runs = [(r, json.loads((out / f"eval_{r}" / "metrics.json").read_text())) for r in rows]
    count = runs[0][1]["num_images"]
    text = [f"# QLIP's first result on the reference world ({count} held-out prompts)\n",
            table([(m.get("label") or r, m) for r, m in runs]),
            f"\nFID floor (real vs real): {runs[0][1].get('fid_floor')}\n",
            "## T2Q and Q2B\n", t2q_table(out),
            "\n## Paired comparisons (A − B, 95% paired bootstrap)\n"]
    comparisons = {}
    for a, b in _pairs(rows):
        result = compare_runs(CompareConfig(str(out / f"eval_{a}"), str(out / f"eval_{b}"),
                                            resamples=RESAMPLES, device=device))
        comparisons[f"{a} vs {b}"] = comparison_json(result)
        text.append(f"### {a} vs {b}\n\n{comparison_markdown(result)}\n")
    (out / "comparisons.json").write_text(json.dumps(comparisons, indent=2))
    (out / "summary.md").write_text("\n".join(text) + "\n")
    figures = [p for s in SETS for p in sorted((out / f"figures_{s}").glob("*"))]
    qlip_files = [out / f"q_qlip_{s}" / "qlip.json" for s in SETS]
    extra = [grid(out, rows), out / "comparisons.json", out / "timings.txt", out / "summary.md",
             *figures, *qlip_files]
    tars = export(out, rows, extra)
    print("\n".join(text))
    print("exported: " + ", ".join(f"{t.name} ({t.stat().st_size / 2**20:.1f} MB)" for t in tars))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
