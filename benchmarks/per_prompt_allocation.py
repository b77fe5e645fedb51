"""Where a prompt-driven policy puts its bits, prompt by prompt, and what each prompt gets for
them (issue 12 item 2's "show why"), from the per-image scores of finished evals of the same
prompts and seeds (``features.safetensors``):

- each prompt's **damage** at prompt-free bits (``--damage``, e.g. the timestep-only control):
  minus its PSNR to FP, so that higher means more damaged;
- the policy's per-prompt FAB against that damage: Spearman's ρ with a 95% bootstrap interval,
  overall and per caption richness level;
- against a random policy with the policy's own proportions (``--random``, optional; drawn per prompt, so
  its per-prompt FAB barely varies): per quartile of the policy's extra bits per prompt, the
  mean PSNR gain, with a 95% bootstrap interval (``qlip.metrics.bootstrap``'s, as ``qlip eval``'s). A policy that reads the prompt well gains where it adds bits and loses little
  where it takes them away.

    python benchmarks/per_prompt_allocation.py RUN/eval_qlip_4-5-6 --random RUN/eval_random_4-5-6 \\
        --damage RUN/eval_timestep_4-5-6 --out RUN/allocation_qlip.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from qlip.evaluation.compare import check_same_images
from qlip.metrics import srocc
from qlip.metrics.bootstrap import Interval, interval, resample_counts, weighted_means


def scores(folder: Path) -> dict[str, np.ndarray]:
    path = folder / "features.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: pass finished `qlip eval` folders with their features")
    return load_file(str(path))


def spearman_interval(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> Interval:
    """ρ with its bootstrap interval (images resampled in pairs; the project's re-centred
    percentile interval, as every figure of ``qlip eval``)."""
    counts = resample_counts(len(x), resamples, seed).long().numpy()
    index = np.arange(len(x))
    samples = [srocc(x[i], y[i]) for i in (np.repeat(index, c) for c in counts)]
    return interval(srocc(x, y), np.array(samples))


def mean_interval(values: np.ndarray, resamples: int, seed: int) -> Interval:
    """The mean with its bootstrap interval."""
    return interval(float(values.mean()),
                    weighted_means(resample_counts(len(values), resamples, seed), values))


def _rho_or_none(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's ρ, or None where it is undefined (a constant input): JSON has no NaN."""
    return None if np.ptp(x) == 0 or np.ptp(y) == 0 else srocc(x, y)


def analyse(policy: dict, random: dict | None, damage_run: dict, resamples: int,
            seed: int) -> dict:
    fab, damage = policy["score.fab"], -damage_run["score.psnr_vs_reference"]
    richness = policy["group.richness"]
    rho = spearman_interval(fab, damage, resamples, seed)
    levels = {}
    for level in np.unique(richness).tolist():
        m = richness == level
        levels[int(level)] = {"images": int(m.sum()), "mean_fab": float(fab[m].mean()),
                              "mean_psnr_prompt_free_db": float(-damage[m].mean()),
                              "spearman_fab_damage": _rho_or_none(fab[m], damage[m])}
    out = {"images": len(fab), "fab_std": {"policy": float(fab.std())},
           "spearman_fab_damage": {"rho": rho.estimate, "interval": rho.to_list(),
                                   "resamples": resamples},
           "by_richness": levels}
    if random is None:  # no control with the policy's proportions: where the bits go only
        return out
    extra = fab - random["score.fab"]
    gain = policy["score.psnr_vs_reference"] - random["score.psnr_vs_reference"]
    edges = np.quantile(extra, [0, 0.25, 0.5, 0.75, 1])
    quarter = np.searchsorted(edges[1:-1], extra, side="right")  # 0 … 3
    quartiles = []
    for i in range(4):
        mean = mean_interval(gain[quarter == i], resamples, seed)
        quartiles.append({"extra_fab": [float(edges[i]), float(edges[i + 1])],
                          "images": int((quarter == i).sum()),
                          "mean_psnr_gain_db": mean.estimate, "interval": mean.to_list()})
    out["fab_std"]["random"] = float(random["score.fab"].std())
    return out | {"gain_over_random_by_extra_bits": quartiles,
                  "mean_psnr_gain_over_random_db": float(gain.mean())}


def markdown(name: str, result: dict) -> str:
    s, std = result["spearman_fab_damage"], result["fab_std"]
    random = f" (random {std['random']:.4f})" if "random" in std else ""
    lines = [f"**{name}** ({result['images']} prompts): Spearman ρ(per-prompt FAB, damage) "
             f"{s['rho']:+.3f} [{s['interval'][0]:+.3f}, {s['interval'][1]:+.3f}]; per-prompt FAB "
             f"std {std['policy']:.4f}{random}",
             "", "| richness | mean FAB | PSNR to FP at prompt-free bits (dB) | ρ(FAB, damage) |",
             "|---:|---:|---:|---:|"]
    for level, row in result["by_richness"].items():
        rho = row["spearman_fab_damage"]  # None where every prompt of the level got one FAB
        lines.append(f"| {level} | {row['mean_fab']:.3f} | {row['mean_psnr_prompt_free_db']:.2f} | "
                     f"{'– (one FAB)' if rho is None else f'{rho:+.3f}'} |")
    if "gain_over_random_by_extra_bits" not in result:
        return "\n".join(lines)
    lines += ["", "| extra bits over random (quartile) | prompts | mean PSNR gain over random (dB) |",
              "|---|---:|---|"]
    for q in result["gain_over_random_by_extra_bits"]:
        lines.append(f"| [{q['extra_fab'][0]:+.3f}, {q['extra_fab'][1]:+.3f}] | {q['images']} | "
                     f"{q['mean_psnr_gain_db']:+.3f} [{q['interval'][0]:+.3f}, "
                     f"{q['interval'][1]:+.3f}] |")
    lines.append(f"\nMean PSNR gain over random: {result['mean_psnr_gain_over_random_db']:+.3f} dB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", type=Path, help="the prompt-driven policy's eval folder")
    parser.add_argument("--random", type=Path,
                        help="the eval of random bits with the policy's proportions (without "
                             "it, the report has no gains over random)")
    parser.add_argument("--damage", type=Path, required=True,
                        help="an eval at prompt-free bits (e.g. the timestep-only control)")
    parser.add_argument("--name", help="the policy's name in the report (default: its folder)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    args = parser.parse_args()
    others = [f for f in (args.random, args.damage) if f is not None]
    runs = {folder: scores(folder) for folder in (args.policy, *others)}
    for other in others:  # the same prompts and seeds, image by image
        try:
            check_same_images(args.policy, other, len(runs[args.policy]["score.fab"]),
                              len(runs[other]["score.fab"]))
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from None
    result = analyse(runs[args.policy], runs.get(args.random), runs[args.damage], args.resamples,
                     args.seed)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(args.name or args.policy.name, result))


if __name__ == "__main__":
    main()
