"""Several evals side by side, per caption richness level: FAB, PSNR to FP and alignment, each
with its 95% bootstrap interval, from the evals' own ``metrics.json`` (``by_richness``, written by
``qlip eval`` on the reference world's held-out prompts). It shows where a policy puts its bits
across prompts, and what that does to each level's quality.

    python benchmarks/by_richness_plot.py OUT.png RUN/eval_qlip_4-5-6=QLIP \\
        RUN/eval_timestep_4-5-6="timestep-only" RUN/eval_qd_w4a5=W4A5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("fab", "FAB (bits)"), ("psnr_vs_reference", "PSNR to FP (dB)"),
          ("alignment", "alignment"))


def load(spec: str) -> tuple[str, dict]:
    """``FOLDER[=LABEL]`` → (label, its ``by_richness`` table)."""
    folder, _, label = spec.partition("=")
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: pass finished `qlip eval` folders")
    levels = json.loads(path.read_text()).get("by_richness")
    if not levels:
        raise SystemExit(f"{path} has no by_richness table (an eval of the reference world's "
                         "held-out prompts writes one)")
    return label or Path(folder).name.removeprefix("eval_"), levels


def plot(runs: list[tuple[str, dict]], out: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8))
    width = 0.8 / len(runs)
    for i, (label, levels) in enumerate(runs):
        keys = sorted(levels, key=int)
        x = [int(k) - 0.4 + width * (i + 0.5) for k in keys]
        for ax, (metric, _) in zip(axes, PANELS):
            values = [levels[k][metric] for k in keys]
            bands = [levels[k].get("intervals", {}).get(metric) or (v, v)
                     for k, v in zip(keys, values)]
            err = [[v - lo for v, (lo, _) in zip(values, bands)],
                   [hi - v for v, (_, hi) in zip(values, bands)]]
            ax.errorbar(x, values, yerr=err, fmt="o", ms=4, capsize=2, label=label)
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_xlabel("caption richness level (0: the bare noun)")
        ax.set_ylabel(name)
        ax.set_xticks(sorted({int(k) for _, levels in runs for k in levels}))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("evals", nargs="+", help="eval folders, each FOLDER or FOLDER=LABEL")
    parser.add_argument("--title", default="Per caption richness level")
    args = parser.parse_args()
    print(plot([load(spec) for spec in args.evals], args.out, args.title))


if __name__ == "__main__":
    main()
