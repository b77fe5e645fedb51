"""`qlip compare RUN_A RUN_B`: paired differences of two eval folders on the same prompts and
seeds, with a verdict per metric ("A better", "B better", "not distinguishable at N images").

Works from the folders' ``features.safetensors`` (no images needed): their prompt/seed digest
decides whether two runs are paired, and where both folders keep ``generated.jsonl`` the refusal
of runs of other prompts or seeds, or of other sizes, names the first mismatch.

Example:
    >>> result = compare_runs("eval/qd_w4a8", "eval/qd_w4a16")
    >>> print(comparison_markdown(result))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..metrics.bootstrap import BootstrapConfig
from .intervals import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    Decision,
    PairedDifference,
    decide,
    paired_differences,
)
from .run_features import load_run_features

SKIPPED = ("fab_requested",)  # the request, not what ran: not a comparison


@dataclass
class CompareConfig:
    run_a: str
    run_b: str
    resamples: int = 500
    seed: int = 0
    device: str = "cpu"


@dataclass
class Comparison:
    label_a: str
    label_b: str
    num_images: int
    differences: list[PairedDifference]
    config: BootstrapConfig

    @property
    def decision(self) -> Decision:
        """The decision rule (docs/metrics.md) on this comparison."""
        return decide({d.name: d.verdict for d in self.differences})


def _records(folder: Path) -> list[dict]:
    path = folder / "generated.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an eval folder (no generated.jsonl)")
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["index"]] = record
    return [records[i] for i in sorted(records)]


def check_same_images(folder_a: Path, folder_b: Path, count_a: int, count_b: int) -> None:
    """Refuse runs that are not of the same prompts and seeds, naming the first mismatch."""
    if count_a != count_b:
        raise ValueError(f"{folder_a} has {count_a} images and {folder_b} {count_b}: a paired "
                         "comparison needs the same images; evaluate both with one --num-images")
    records_a, records_b = _records(folder_a)[:count_a], _records(folder_b)[:count_b]
    for a, b in zip(records_a, records_b):
        if (a.get("prompt"), a.get("seed")) != (b.get("prompt"), b.get("seed")):
            raise ValueError(
                f"the runs differ at image {a['index']}: {a.get('prompt')!r} seed {a.get('seed')}"
                f" in {folder_a}, {b.get('prompt')!r} seed {b.get('seed')} in {folder_b}; "
                "compare runs evaluated with the same --prompts, --num-images and --seed")


def compare_runs(config: CompareConfig) -> Comparison:
    """Paired bootstrap differences A − B of every metric both runs have."""
    folder_a, folder_b = Path(config.run_a), Path(config.run_b)
    run_a, run_b = load_run_features(folder_a), load_run_features(folder_b)
    digest_a, digest_b = run_a.meta.get("pairs"), run_b.meta.get("pairs")
    listed = all((f / "generated.jsonl").is_file() for f in (folder_a, folder_b))
    if listed:  # the records name the first image where the runs differ
        check_same_images(folder_a, folder_b, run_a.num_images, run_b.num_images)
    elif not (digest_a and digest_b):
        raise FileNotFoundError(
            f"{folder_a if not digest_a else folder_b} has neither generated.jsonl nor a "
            "prompt/seed digest in its features: copy its generated.jsonl beside "
            "features.safetensors, or evaluate it again")
    if digest_a != digest_b:
        raise ValueError(
            "the runs' prompt/seed digests differ" + (
                " although generated.jsonl agrees: a folder was edited by hand; evaluate it again"
                if listed else ": they are not of the same prompts and seeds; compare runs "
                "evaluated with the same --prompts, --num-images and --seed"))
    bootstrap = BootstrapConfig(resamples=config.resamples, seed=config.seed,
                                device=config.device)
    if run_a.meta.get("reference_run") != run_b.meta.get("reference_run"):
        for run in (run_a, run_b):  # set fidelity metrics only against a shared reference
            run.features.pop("reference", None)
    differences = [d for d in paired_differences(run_a, run_b, bootstrap)
                   if d.name not in SKIPPED]
    return Comparison(run_a.meta.get("label") or folder_a.name,
                      run_b.meta.get("label") or folder_b.name, run_a.num_images, differences,
                      bootstrap)


def _direction(name: str) -> str:
    return "lower" if name in LOWER_IS_BETTER else "higher" if name in HIGHER_IS_BETTER else "–"


def comparison_markdown(result: Comparison) -> str:
    """A table: metric, better direction, A, B, A − B [95% paired interval], verdict."""
    lines = [f"A = {result.label_a}, B = {result.label_b}; {result.num_images} paired images, "
             f"{result.config.resamples} paired bootstrap resamples (seed {result.config.seed})",
             "", "| metric | better | A | B | A − B | 95% interval | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for d in result.differences:
        lines.append(f"| {d.name} | {_direction(d.name)} | {d.a:.4g} | {d.b:.4g} | "
                     f"{d.difference.estimate:+.4g} | [{d.difference.low:+.4g}, "
                     f"{d.difference.high:+.4g}] | {d.verdict} |")
    lines += ["", result.decision.sentence(result.label_a, result.label_b, result.num_images)]
    return "\n".join(lines)


def comparison_json(result: Comparison) -> dict:
    decision = result.decision
    return {"a": result.label_a, "b": result.label_b, "num_images": result.num_images,
            "resamples": result.config.resamples, "seed": result.config.seed,
            "metrics": {d.name: {"a": d.a, "b": d.b, "difference": d.difference.estimate,
                                 "interval": d.difference.to_list(), "verdict": d.verdict}
                        for d in result.differences},
            "decision": {"rule": "docs/metrics.md", "quality_kept": decision.kept,
                         "overall": decision.overall,
                         "measures": list(decision.measures), "a_worse_on": list(decision.worse),
                         "a_better_on": list(decision.better), "missing": list(decision.missing)}}


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of two eval folders (same prompts "
                       "and seeds): A better / B better / not distinguishable, per metric")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--resamples", type=int, default=CompareConfig.resamples)
    p.add_argument("--seed", type=int, default=CompareConfig.seed)
    p.add_argument("--device", default="cpu", help="where the bootstrap's linear algebra runs")
    p.add_argument("--json", help="also write the comparison to this JSON file")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args) -> int:
    result = compare_runs(CompareConfig(args.run_a, args.run_b, args.resamples, args.seed,
                                        args.device))
    print(comparison_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(comparison_json(result), indent=2))
    return 0
