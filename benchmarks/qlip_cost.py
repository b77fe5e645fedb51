"""QLIP's cost per image against the same quantized model at fixed bits, in one run on one device
(issue 11 item 4, issue 12 item 5; the paper: 4.85 s against 4.53 s for fixed W4A8, +7%).

Every policy generates the same prompts with the same seeds, taking turns (policy order rotated
each round), and the device is synchronised around each timed batch:

- ``fixed A{b}``: :class:`FixedBits` at each bit-width of Q2B's set;
- ``QLIP``: :class:`QLIPPolicy` (T2Q once per prompt, Q2B's bits of every step at ``begin``);
- ``replay``: QLIP's own bits for these prompts, computed beforehand and replayed step by step,
  so that ``QLIP / replay`` is the selection's own cost and ``replay / fixed`` what running the
  chosen (mixed) assignment costs.

``--pairs N`` then times QLIP against each policy of ``--pair-with`` in N adjacent pairs (the
order alternating), so that the host's drift between minutes cancels in each pair's ratio; the
row reports the median ratio and a 95% bootstrap interval of the mean log ratio. (Run 3 on the
H200 showed one policy's rounds 30% apart: rounds alone do not resolve a few percent.)

``--selection-reps N`` times the selection alone, N times per batch: QLIP's ``begin`` (T2Q on the
prompts' embeddings, then Q2B's bits for every step and unit), the device synchronised around
each call. Its median per image, over the fixed policies' median seconds per image, is the
selection's share of an image's cost, measured in milliseconds where the end-to-end ratios
above are within the host's drift. (It leaves out what the chosen mixed bits cost the steps:
``replay / fixed`` measures that.)

    python benchmarks/qlip_cost.py RUN/q_qlip_8-16-32 --out RUN/qlip_cost.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qlip.pipeline import GenerationConfig, generate, load_pipeline
from qlip.pipeline.prompts import encode_prompt_batch
from qlip.pipeline.quantized_model import load_for_sampling
from qlip.policies import FixedBits, PlannedBits, PromptBatch, QLIPPolicy
from qlip.world.domain import heldout_prompts


class ReplayBits(PlannedBits):
    """Replays bits computed beforehand ([S, B, U] per batch, in batch order)."""

    def __init__(self, batches: list[torch.Tensor], possible: set[int]):
        self.batches, self.possible, self.index = batches, possible, 0
        self._bits = batches[0]

    def possible_bits(self) -> set[int]:
        return self.possible

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        self._bits = self.batches[self.index % len(self.batches)].to(batch.device)
        self.index += 1

    def describe(self) -> str:
        return "replayed QLIP bits"


def paired_ratio(ratios: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Median of paired time ratios A/B and a 95% bootstrap interval of their geometric mean."""
    logs = np.log(np.asarray(ratios))
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, len(logs), (resamples, len(logs)))].mean(axis=1)
    low, high = np.exp(np.percentile(means, [2.5, 97.5]))
    return {"pairs": len(ratios), "median": float(np.median(ratios)),
            "geometric_mean": float(np.exp(logs.mean())), "interval95": [float(low), float(high)],
            "ratios": [float(r) for r in ratios]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(pipe, prompts, seeds, policy, config, device: str) -> float:
    """Seconds of one generation of ``prompts`` under ``policy``, the device synchronised."""
    if isinstance(policy, ReplayBits):
        policy.index = 0
    _sync(device)
    start = time.perf_counter()
    generate(pipe, prompts, seeds, policy, config, progress=False)
    _sync(device)
    return time.perf_counter() - start


def selection_seconds(pipe, policy, prompts, batch_size: int, steps: int, reps: int,
                      device: str) -> list[float]:
    """Seconds of each of ``reps`` calls of ``policy.begin`` per batch of ``prompts`` (the text
    encoded beforehand, as the pipeline does for every policy), the device synchronised."""
    batches = [encode_prompt_batch(pipe, prompts[start:start + batch_size])
               for start in range(0, len(prompts), batch_size)]
    took = []
    for _ in range(reps):
        for batch in batches:
            _sync(device)
            start = time.perf_counter()
            policy.begin(batch, steps)
            _sync(device)
            took.append(time.perf_counter() - start)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quantized", help="a folder with qlip.json (`qlip train-qlip`)")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    parser.add_argument("--batch-modes", default="per_image,max", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per policy (median)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="adjacent QLIP / other pairs per policy of --pair-with (0: none)")
    parser.add_argument("--pair-with", default="replay",
                        help="comma-separated policy names (replay, 'fixed A8', ...)")
    parser.add_argument("--selection-reps", type=int, default=0,
                        help="time QLIP's selection (begin) alone this many times per batch")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    if min(args.batches, args.rounds) < 1 or min(args.pairs, args.selection_reps) < 0:
        raise SystemExit("--batches and --rounds take at least 1; --pairs and --selection-reps "
                         "at least 0")

    pipe = load_pipeline(args.model, args.device)
    qlip_policy = load_for_sampling(pipe, args.quantized)
    if not isinstance(qlip_policy, QLIPPolicy):
        raise SystemExit(f"{args.quantized} holds no trained QLIP (qlip.json): run `qlip "
                         "train-qlip` first")
    world = [p.text for p in heldout_prompts()]
    options = sorted(qlip_policy.possible_bits())
    known = {f"fixed A{b}" for b in options} | {"replay"}
    pair_with = [n.strip() for n in args.pair_with.split(",")] if args.pairs else []
    unknown = [n for n in pair_with if n not in known]
    if unknown:  # before any generation
        raise SystemExit(f"--pair-with {unknown[0]!r}: not one of {sorted(known)}")
    rows = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        prompts = world[: args.batches * batch_size]
        seeds = list(range(len(prompts)))
        for mode in args.batch_modes.split(","):
            if batch_size == 1 and mode == "max" and "per_image" in args.batch_modes:
                continue  # one prompt a batch: the two modes are the same run
            config = GenerationConfig(steps=args.steps, guidance=args.guidance,
                                      batch_size=batch_size, batch_mode=mode)
            # QLIP's bits for these prompts, batch by batch, to replay
            chosen = []
            for start in range(0, len(prompts), batch_size):
                qlip_policy.begin(encode_prompt_batch(pipe, prompts[start:start + batch_size]),
                                  args.steps)
                chosen.append(qlip_policy.planned.clone())
            result = generate(pipe, prompts, seeds, qlip_policy, config, progress=False)  # warm-up
            policies = {f"fixed A{b}": FixedBits(b) for b in options}
            policies |= {"QLIP": qlip_policy, "replay": ReplayBits(chosen, set(options))}
            fab = statistics.fmean(r.fab for r in result.reports)
            times: dict[str, list[float]] = {name: [] for name in policies}
            names = list(policies)
            for turn in range(args.rounds):
                for name in names[turn % len(names):] + names[: turn % len(names)]:
                    took = _timed(pipe, prompts, seeds, policies[name], config, args.device)
                    times[name].append(took / len(prompts))
            paired = {}
            for other in pair_with:
                ratios = []
                for i in range(args.pairs):
                    first, second = (other, "QLIP") if i % 2 else ("QLIP", other)
                    took = {name: _timed(pipe, prompts, seeds, policies[name], config, args.device)
                            for name in (first, second)}
                    ratios.append(took["QLIP"] / took[other])
                paired[f"QLIP / {other}"] = paired_ratio(ratios)
            median = {name: statistics.median(t) for name, t in times.items()}
            selection = {}
            if args.selection_reps:
                took = selection_seconds(pipe, qlip_policy, prompts, batch_size, args.steps,
                                         args.selection_reps, args.device)
                per_image = statistics.median(took) / batch_size
                fixed = statistics.median(median[f"fixed A{b}"] for b in options)
                selection = {"calls": len(took), "median_seconds_per_call": statistics.median(took),
                             "seconds_per_image": per_image,
                             "share_of_fixed_image": per_image / fixed}
            row = {"batch_size": batch_size, "batch_mode": mode, "images": len(prompts),
                   "qlip_fab": fab,
                   "seconds_per_image": median, "all_rounds": times,
                   "qlip_over_replay": median["QLIP"] / median["replay"] - 1,
                   "qlip_over_fixed": {f"A{b}": median["QLIP"] / median[f"fixed A{b}"] - 1
                                       for b in options},
                   "paired": paired, "selection": selection}
            rows.append(row)
            print(f"batch {batch_size} {mode}: " + ", ".join(
                f"{n} {1e3 * s:.1f} ms/img" for n, s in median.items()) +
                f"; QLIP/replay {100 * row['qlip_over_replay']:+.1f}%; QLIP FAB {fab:.2f}" + "".join(
                f"; paired {k} {v['median']:.4f} [{v['interval95'][0]:.4f}, "
                f"{v['interval95'][1]:.4f}]" for k, v in paired.items()) + (
                f"; selection {1e3 * selection['seconds_per_image']:.3f} ms/img "
                f"({100 * selection['share_of_fixed_image']:.2f}% of fixed)" if selection else ""))
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"device": gpu, "torch": torch.__version__, "quantized": args.quantized,
           "steps": args.steps, "guidance": args.guidance,
           "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
