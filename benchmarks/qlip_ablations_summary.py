"""Summary of benchmarks/qlip_ablations.sh: OUT/ablations.md and OUT/ablations_lambda.png.

For QLIP and every ablation row: T2Q's held-out SROCC and PLCC (from the row's qlip.json), FAB,
BitOPs, FID, PSNR to FP and alignment with their 95% intervals (from its metrics.json), and the
paired comparison against QLIP (``qlip compare``'s code; OUT/compare_<row>_vs_<qlip>.{md,json}):
FID, PSNR to FP and alignment in the table, and docs/metrics.md's decision rule over its seven
deciding measures. The plot: FAB against PSNR to FP and against FID for QLIP's
λ rows (and QLIP itself) beside the fixed-bits rows ``eval_<mtag>_w4a<bits>``, with intervals.

    python benchmarks/qlip_ablations_summary.py OUT --qlip qlip_8-16-32 label_realism lam_0.2 ...
"""

from __future__ import annotations

import argparse
import json
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlip.evaluation.compare import (  # noqa: E402
    CompareConfig,
    compare_runs,
    comparison_json,
    comparison_markdown,
)

SHOWN = ("fid", "psnr_vs_reference", "alignment")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(metrics: dict, name: str, digits: int = 3) -> str:
    value = metrics.get(name)
    if value is None:
        return "–"
    low, high = (metrics.get("intervals", {}).get(name) or [None, None])
    band = f" [{low:.{digits}g}, {high:.{digits}g}]" if low is not None else ""
    return f"{value:.{digits}g}{band}"


def _t2q(qlip_json: dict | None) -> tuple[str, str, str]:
    t2q = (qlip_json or {}).get("metrics", {}).get("t2q") or {}
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    return t2q.get("label", "–"), fmt(t2q.get("srocc")), fmt(t2q.get("plcc"))


def _verdicts(out: Path, name: str, qlip: str, resamples: int, device: str) -> dict[str, str]:
    """The row against QLIP, paired: OUT/compare_<row>_vs_<qlip>.{json,md} (``qlip compare``'s
    files) and the cells of the summary's table (the shown measures and the rule's verdict)."""
    config = CompareConfig(str(out / f"eval_{name}"), str(out / f"eval_{qlip}"),
                           resamples=resamples, device=device)
    result = compare_runs(config)
    stem = out / f"compare_{name}_vs_{qlip}"
    stem.with_suffix(".json").write_text(json.dumps(comparison_json(result), indent=1))
    stem.with_suffix(".md").write_text(comparison_markdown(result) + "\n")
    cells = {d.name: f"{d.difference.estimate:+.3g} [{d.difference.low:+.3g}, "
                     f"{d.difference.high:+.3g}] {d.verdict}"
             for d in result.differences if d.name in SHOWN}
    decision = result.decision
    detail = "; ".join(f"{what} on {', '.join(names)}" for what, names in
                       (("better", decision.better), ("worse", decision.worse)) if names)
    cells["rule"] = f"{decision.overall}" + (f" ({detail})" if detail else "")
    return cells


def _lambda_plot(out: Path, rows: dict[str, dict], qlip: str, mtag: str) -> Path | None:
    fixed = {}
    for folder in out.glob(f"eval_{mtag}_w4a*"):
        match = re.fullmatch(rf"eval_{mtag}_w4a(\d+)", folder.name)
        metrics = _read(folder / "metrics.json")
        if match and metrics:
            fixed[int(match.group(1))] = metrics
    lam_rows = {name: m for name, m in rows.items() if name.startswith("lam_") or name == qlip}
    if not any(name.startswith("lam_") for name in lam_rows) or not fixed:  # no λ curve to draw
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "psnr_vs_reference", "PSNR to FP (dB), higher is better"),
                              (axes[1], "fid", "FID, lower is better")):
        for series, marker, colour in ((fixed, "s", "tab:gray"), (lam_rows, "o", "tab:blue")):
            keys = sorted(series, key=lambda k: series[k]["fab"])
            xs = [series[k]["fab"] for k in keys]
            ys = [series[k].get(metric) for k in keys]
            band = [series[k].get("intervals", {}).get(metric) or [y, y] for k, y in zip(keys, ys)]
            err = [[y - b[0] for y, b in zip(ys, band)], [b[1] - y for y, b in zip(ys, band)]]
            ax.errorbar(xs, ys, yerr=err, marker=marker, color=colour, capsize=3,
                        label="fixed bits" if series is fixed else "QLIP, λ sweep")
            for k, x, y in zip(keys, xs, ys):
                text = f"A{k}" if series is fixed else ("λ 0.1" if k == qlip else
                                                        "λ " + k.removeprefix("lam_"))
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("FAB (bits, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("QLIP's λ against fixed activation bits (95% bootstrap intervals)")
    fig.tight_layout()
    path = out / "ablations_lambda.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="+", help="ablation rows (OUT/eval_abl_<name>)")
    parser.add_argument("--qlip", required=True, help="QLIP's name (OUT/eval_<name>, q_<name>)")
    parser.add_argument("--mtag", default="qd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1,
                        help="comparisons run at once, each in its own process")
    args = parser.parse_args()
    out = args.out
    base = _read(out / f"eval_{args.qlip}" / "metrics.json")
    if base is None:
        raise SystemExit(f"{out}/eval_{args.qlip}/metrics.json is missing: QLIP's eval comes first")
    rows = {args.qlip: base}
    lines = [f"# QLIP's ablations ({base['num_images']} held-out prompts, 95% intervals)", "",
             "| row | T2Q label | SROCC | PLCC | FAB | BitOPs (T) | FID | PSNR to FP | alignment |"
             " vs QLIP: FID | vs QLIP: PSNR | vs QLIP: alignment | vs QLIP, by the decision rule |",
             "|---|---|---:|---:|---:|---:|---|---|---|---|---|---|---|"]
    names = [f"abl_{n}" for n in args.names]
    evaluated = [n for n in names if (out / f"eval_{n}" / "metrics.json").is_file()]
    # the paired comparisons, --jobs at once (each a bootstrap of its own; spawn: CUDA-safe)
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        futures = {n: pool.submit(_verdicts, out, n, args.qlip, args.resamples, args.device)
                   for n in evaluated}
        verdict_of = {n: f.result() for n, f in futures.items()}
    for name in [args.qlip] + names:
        metrics = rows.get(name) or _read(out / f"eval_{name}" / "metrics.json")
        label, sr, pl = _t2q(_read(out / f"q_{name}" / "qlip.json"))
        if metrics is None:
            lines.append(f"| {name} | {label} | {sr} | {pl} | (not evaluated) ||||||||")
            continue
        rows[name.removeprefix("abl_")] = metrics
        verdicts = verdict_of.get(name, {})
        lines.append(
            f"| {name} | {label} | {sr} | {pl} | {metrics['fab']:.2f} | {metrics['bitops_t']:.3f} "
            f"| {_cell(metrics, 'fid')} | {_cell(metrics, 'psnr_vs_reference')} | "
            f"{_cell(metrics, 'alignment')} | "
            + " | ".join(verdicts.get(m, "–") for m in SHOWN + ("rule",)) + " |")
    plot = _lambda_plot(out, rows, args.qlip, args.mtag)
    if plot:
        lines += ["", f"![λ against fixed bits]({plot.name})"]
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
