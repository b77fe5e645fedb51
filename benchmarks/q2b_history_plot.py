"""Q2B's training curves from the checkpoints' histories (``q2b_ckpt.json`` in each Q2B folder of
a ``qlip train-qlip`` work folder): the MSE to the FP ε and the FAB of the forward choice per
iteration, with a moving average, one line per bit set. What `--q2b-iters` is chosen from.

    python benchmarks/q2b_history_plot.py RUN/qlip_work*/q2b_*/q2b_ckpt.json --out q2b_history.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def moving(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("histories", nargs="+", help="q2b_ckpt.json files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    fig, (ax_mse, ax_fab) = plt.subplots(1, 2, figsize=(9, 3.4))
    summary = {}
    for path in args.histories:
        history = json.loads(Path(path).read_text())["history"]
        name = Path(path).parent.name.removeprefix("q2b_")
        mse = np.array([h["mse"] for h in history])
        fab = np.array([h["fab"] for h in history])
        x = np.arange(args.window, len(history) + 1)
        ax_mse.plot(x, moving(mse, args.window), label=name)
        ax_fab.plot(x, moving(fab, args.window), label=name)
        summary[name] = {f"{a}-{a + 100}": {"mse": float(mse[a:a + 100].mean()),
                                            "fab": float(fab[a:a + 100].mean())}
                         for a in range(0, len(history), 100)}
    ax_mse.set(xlabel="iteration", ylabel=f"MSE to FP ε (mean of {args.window})", yscale="log")
    ax_fab.set(xlabel="iteration", ylabel=f"FAB of the forward choice (mean of {args.window})")
    for ax in (ax_mse, ax_fab):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
