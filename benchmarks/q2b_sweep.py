"""Q2B's settings measured one at a time around the defaults (issue 11: M, m, λ, the optimiser and
the iteration count chosen by measurement), judged on held-out prompts.

The stages before Q2B (T2Q data, GIQA labels, T2Q, the training prompts' FP trajectories) are
`qlip train-qlip`'s own, run or reused from its work folder (``prepare_q2b``). The validation
prompts are the next ``--val-prompts`` prompts of the same training distribution (prompts N, N+1,
… of the same seed: neither T2Q nor Q2B sees them, and the reference world's held-out texts are
excluded as in training); their FP trajectories (seeds after the N training prompts') are cached
in the work folder too. Every config trains a fresh Q2B (``train_q2b``, its checkpoint in the
work folder) and is scored on the validation rows with every dynamic unit at Q2B's argmax choice:
the ε-MSE to the FP UNet per prompt (mean over its rows: every step, both guidance halves) and
the FAB of the dynamic units; the fixed points A{b} are scored the same way. Each result is
written to the JSON as it finishes; a rerun skips every config whose settings match.

    python benchmarks/q2b_sweep.py --quantized runs/sweep/q_w4_456 --work-dir runs/sweep/work \\
        --bits 4,5,6 --out benchmarks/results/q2b_sweep.cpu.json \\
        --plot docs/results/qlip/q2b_defaults/q2b_sweep.png

The centre of the sweep ("default@N") is the library's defaults unless ``--centre-*`` say
otherwise; the recorded sweep (docs/results/qlip/q2b_defaults/README.md) was centred on the
defaults before it, ``--centre-lr 0.01``. A rerun with other settings recomputes only the configs
whose settings differ; ``--only NAME,...`` runs those configs alone, e.g. a longer run of one
(``--iters 200 --only lr=0.1@200`` continues lr=0.1@100 from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlip.files import FolderLock, load_tensors, save_tensors, write_atomic
from qlip.methods.calib_data import CalibrationSet
from qlip.methods.qlip import Q2B, Q2BConfig, Q2BTrainConfig, T2QConfig, train_q2b
from qlip.methods.qlip.train import fp_targets
from qlip.methods.unet_inputs import call_unet
from qlip.nn import quant_units
from qlip.pipeline.cache import digest, file_digest
from qlip.pipeline.prompts import encode_prompt_batch
from qlip.pipeline.qlip_data import FPRunConfig, trajectory_data
from qlip.pipeline.saving import STATE_FILE
from qlip.qlip_training import Q2BInputs, TrainQLIPConfig, prepare_q2b
from qlip.qlip_training.job import training_prompts
from qlip.quant import parse_bits_list


@dataclass
class Run:
    """One trained Q2B of the sweep: a name, its settings, what it varies."""

    name: str
    factor: str  # "default", "lam", "M", "m", "lr", "optimizer"
    q2b: Q2BConfig
    train: Q2BTrainConfig
    extra: dict = field(default_factory=dict)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantized", required=True, help="a `qlip quantize` folder with a bank")
    p.add_argument("--model", default="reference")
    p.add_argument("--work-dir", required=True, help="train-qlip's work folder (caches)")
    p.add_argument("--bits", default="4,5,6", help="Q2B's option set, low to high")
    p.add_argument("--num-prompts", type=int, default=64, help="N, T2Q's FP generations")
    p.add_argument("--q2b-prompts", type=int, default=32, help="prompts whose trajectories train Q2B")
    p.add_argument("--val-prompts", type=int, default=16, help="validation prompts (after the N)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--t2q-iters", type=int, default=500)
    p.add_argument("--iters", type=int, default=100, help="Q2B iterations of every swept config")
    p.add_argument("--default-evals", default="50,100,200",
                   help="iteration counts at which the default run is scored (one run, continued)")
    p.add_argument("--batch-size", type=int, default=Q2BTrainConfig.batch_size)
    p.add_argument("--centre-lr", type=float, default=Q2BTrainConfig.lr,
                   help="the sweep's centre (\"default\"): lr; the library's defaults unless given")
    p.add_argument("--centre-lam", type=float, default=Q2BTrainConfig.lam)
    p.add_argument("--centre-group-steps", type=int, default=Q2BConfig.group_steps)
    p.add_argument("--centre-high-steps", type=int, default=Q2BConfig.high_steps)
    p.add_argument("--lams", default="0.03,0.1,0.3,1.0")
    p.add_argument("--group-steps", default="1,5,25", help="M values")
    p.add_argument("--high-steps", default="0,2,4", help="m values")
    p.add_argument("--lrs", default="1e-3,1e-2,1e-1", help="Adam learning rates")
    p.add_argument("--sgd-lrs", default="1e-1", help="SGD (momentum 0.9) learning rates; '' none")
    p.add_argument("--only", default="", help="config names to run, in this order (default: all), "
                   "e.g. 'M=25@200,default@400'")
    p.add_argument("--eval-batch", type=int, default=16, help="rows per validation forward")
    p.add_argument("--out", required=True, help="the results JSON")
    p.add_argument("--plot", help="PNG of held-out MSE against held-out FAB")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def job_config(args) -> TrainQLIPConfig:
    """train-qlip's config for the shared stages (Q2B's own fields are the defaults)."""
    return TrainQLIPConfig(
        quantized=args.quantized, model=args.model, work_dir=args.work_dir, device="cpu",
        num_prompts=args.num_prompts, q2b_prompts=args.q2b_prompts,
        sampling=FPRunConfig(steps=args.steps, guidance=args.guidance),
        t2q=T2QConfig(iters=args.t2q_iters),
        q2b=Q2BConfig(bits=parse_bits_list(args.bits, "--bits"), group_steps=args.centre_group_steps,
                      high_steps=args.centre_high_steps),
        q2b_train=Q2BTrainConfig(iters=args.iters, batch_size=args.batch_size, lr=args.centre_lr,
                                 lam=args.centre_lam),
        progress=not args.no_progress)


def sweep_runs(args, base: TrainQLIPConfig) -> list[Run]:
    """The default at each of ``--default-evals``, then one factor at a time (at ``--iters``)."""
    q, t = base.q2b, base.q2b_train
    runs = [Run(f"default@{c}", "default", q, replace(t, iters=c)) for c in _ints(args.default_evals)]
    at = f"@{t.iters}"
    runs += [Run(f"lam={v:g}{at}", "lam", q, replace(t, lam=v)) for v in _floats(args.lams)
             if v != t.lam]
    runs += [Run(f"M={v}{at}", "M", replace(q, group_steps=v), t) for v in _ints(args.group_steps)
             if v != q.group_steps]
    runs += [Run(f"m={v}{at}", "m", replace(q, high_steps=v), t) for v in _ints(args.high_steps)
             if v != q.high_steps]
    runs += [Run(f"lr={v:g}{at}", "lr", q, replace(t, lr=v)) for v in _floats(args.lrs) if v != t.lr]
    runs += [Run(f"sgd lr={v:g}{at}", "optimizer", q, replace(t, optimizer="sgd", lr=v))
             for v in _floats(args.sgd_lrs)]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not only:
        return runs
    by_name = {r.name: r for r in runs}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise SystemExit(f"--only {unknown}: no such config; there are {sorted(by_name)}")
    return [by_name[n] for n in only]  # in the order given


# -- the validation set -----------------------------------------------------------------------


@dataclass
class Validation:
    texts: list[str]
    rows: CalibrationSet
    prompt_of_row: torch.Tensor  # [rows] in 0..V-1
    quality: torch.Tensor  # [rows] T2Q's q of each row's prompt
    targets: torch.Tensor  # [rows, C, H, W] FP ε


def cached_targets(unet, rows: CalibrationSet, units, path: Path) -> torch.Tensor:
    """The rows' FP ε, computed once per set of rows (named by ``path``)."""
    if path.is_file():
        return load_tensors(path, f"delete {path}")[0]["eps"]
    eps = fp_targets(unet, rows, units)
    save_tensors({"eps": eps}, path)
    return eps


def validation_set(args, config: TrainQLIPConfig, inputs: Q2BInputs, work: Path) -> Validation:
    n, count = config.num_prompts, args.val_prompts
    texts = training_prompts(replace(config, num_prompts=n + count))[0][n:]
    pipe, sampling = inputs.pipe, inputs.stages.sampling
    folder = work / f"q2b_sweep_validation_after{n}"
    rows, index = trajectory_data(pipe, texts, folder, replace(sampling, seed=sampling.seed + n),
                                  inputs.stages.base)
    with torch.no_grad():
        q = inputs.t2q.model(encode_prompt_batch(pipe, texts).pooled.float().cpu())
    targets = cached_targets(pipe.unet, rows, quant_units(pipe.unet), folder / "fp_eps.safetensors")
    return Validation(texts, rows, index, q[index], targets)


# -- scoring ----------------------------------------------------------------------------------


@torch.no_grad()
def row_errors(unet, units, slots: torch.Tensor, val: Validation, batch: int) -> torch.Tensor:
    """``[rows]`` mean (ε_fp − ε_q)² per row with dynamic unit j at bank slot ``slots[row, j]``."""
    dynamic = [u for u in units.values() if u.dynamic]
    out = torch.empty(len(val.rows))
    try:
        for step in torch.unique(val.rows.steps).tolist():
            index = torch.nonzero(val.rows.steps == step).flatten()
            for unit in units.values():
                unit.set_step(step)
            for start in range(0, len(index), batch):
                sel = index[start : start + batch]
                table = slots[sel].T.contiguous()  # [U, n]: each row its own choice
                for j, unit in enumerate(dynamic):
                    unit.bind_bits(table, j)
                eps = call_unet(unet, val.rows.subset(sel).inputs()).float().cpu()
                out[sel] = (eps - val.targets[sel]).pow(2).flatten(1).mean(1)
    finally:
        for unit in dynamic:
            unit.bind_bits(None, 0)
    return out


def per_prompt(values: torch.Tensor, val: Validation) -> torch.Tensor:
    count = len(val.texts)
    total = torch.zeros(count, dtype=torch.float64).index_add_(0, val.prompt_of_row, values.double())
    return total / torch.bincount(val.prompt_of_row, minlength=count)


def score(unet, units, bits: torch.Tensor, val: Validation, batch: int) -> dict:
    """Held-out MSE and FAB of per-row bits ``[rows, U]``, with per-prompt standard errors."""
    dynamic = [u for u in units.values() if u.dynamic]
    slots = dynamic[0].slot_lookup()[bits]
    mse = per_prompt(row_errors(unet, units, slots, val, batch), val)
    fab = per_prompt(bits.float().mean(1), val)
    n = len(mse)
    return {"mse": float(mse.mean()), "mse_se": float(mse.std() / math.sqrt(n)),
            "fab": float(fab.mean()), "fab_se": float(fab.std() / math.sqrt(n)),
            "per_prompt_mse": [round(float(v), 7) for v in mse],
            "per_prompt_fab": [round(float(v), 4) for v in fab]}


def q2b_bits(q2b: Q2B, val: Validation) -> torch.Tensor:
    """``[rows, U]`` Q2B's argmax bits for each validation row (its prompt's q, its step)."""
    out = torch.empty(len(val.rows), q2b.num_units, dtype=torch.long)
    with torch.no_grad():
        for step in torch.unique(val.rows.steps).tolist():
            sel = torch.nonzero(val.rows.steps == step).flatten()
            out[sel] = q2b.bits(val.quality[sel], step)[0]
    return out


# -- training ---------------------------------------------------------------------------------


def _history_length(folder: Path) -> int:
    path = folder / "q2b_ckpt.json"
    return len(json.loads(path.read_text())["history"]) if path.is_file() else 0


def train_run(run: Run, inputs: Q2BInputs, targets: torch.Tensor, folder: Path, progress: bool):
    """Train (or continue, from ``folder``'s checkpoint) one run's Q2B; (q2b, history, seconds,
    iterations resumed from)."""
    pipe, steps = inputs.pipe, inputs.stages.config.sampling.steps
    units = quant_units(pipe.unet)
    dynamic = [n for n, u in units.items() if u.dynamic]
    resumed = _history_length(folder)
    if resumed > run.train.iters:  # a longer run of the same settings: start again beside it
        folder, resumed = folder.with_name(folder.name + f"-at{run.train.iters}"), 0
        resumed = _history_length(folder)
    q2b = Q2B(len(dynamic), steps, run.q2b)
    start = time.perf_counter()
    history = train_q2b(pipe.unet, q2b, units, inputs.rows, inputs.quality,
                        replace(run.train, progress=progress, checkpoint_every=25), folder, targets)
    return q2b, history, time.perf_counter() - start, resumed


def run_folder(name: str, shared: dict, settings: dict) -> str:
    """One checkpoint folder per run whatever its iteration count: a run of more iterations
    continues the shorter one (``train_q2b`` resumes; the same rows in the same order)."""
    same = [shared, settings["q2b"], {**settings["train"], "iters": None}]
    return f"{name.split('@')[0].replace(' ', '_')}-{digest(same)[:10]}"


def tail(history: list[dict]) -> dict:
    last = history[-max(1, len(history) // 10):]
    return {k: sum(h[k] for h in last) / len(last) for k in ("mse", "fab")}


# -- the record -------------------------------------------------------------------------------


def load_record(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"fixed": {}, "runs": {}}


def paired(record: dict, name: str, reference: str) -> dict | None:
    """Means and standard errors of the per-prompt differences name − reference (the same
    validation prompts): MSE and FAB."""
    a, b = record["runs"].get(name), record["runs"].get(reference)
    if not a or not b:
        return None
    out = {"vs": reference}
    for what, prefix in (("per_prompt_mse", ""), ("per_prompt_fab", "fab_")):
        diff = torch.tensor(a["heldout"][what]) - torch.tensor(b["heldout"][what])
        out |= {f"{prefix}diff": float(diff.mean()),
                f"{prefix}se": float(diff.std() / math.sqrt(len(diff)))}
    return out


def summarise(record: dict) -> None:
    """Each run against the default trained for as many iterations (where there is one); the
    default's own counts against its next shorter one."""
    counts = sorted(e["iters"] for e in record["runs"].values() if e["factor"] == "default")
    for name, entry in record["runs"].items():
        reference = f"default@{entry['iters']}"
        if entry["factor"] == "default":
            shorter = [c for c in counts if c < entry["iters"]]
            reference = f"default@{shorter[-1]}" if shorter else name
        entry["paired"] = paired(record, name, reference) if name != reference else None
    rows = []
    for name, entry in list(record["fixed"].items()) + list(record["runs"].items()):
        h = entry["heldout"]
        rows.append({"name": name, "mse": h["mse"], "mse_se": h["mse_se"], "fab": h["fab"],
                     "fab_se": h["fab_se"], "paired": entry.get("paired"),
                     "train_tail": entry.get("train_tail"),
                     "train_s": entry.get("train_seconds_total", entry.get("train_seconds"))})
    record["table"] = rows


def print_table(record: dict) -> None:
    print(f"{'config':<14}{'MSE':>10}{'±SE':>9}{'FAB':>7}{'±SE':>6}{'ΔMSE':>10}{'±SE':>9}"
          f"{'ΔFAB':>7}{'±SE':>6}{'tr MSE':>9}{'tr FAB':>7}{'train s':>8}")
    for r in record["table"]:
        p, t = r["paired"], r["train_tail"] or {}
        delta = (f"{p['diff']:>10.5f}{p['se']:>9.5f}{p['fab_diff']:>7.3f}{p['fab_se']:>6.3f}"
                 if p else " " * 32)
        print(f"{r['name']:<14}{r['mse']:>10.5f}{r['mse_se']:>9.5f}{r['fab']:>7.3f}{r['fab_se']:>6.3f}"
              f"{delta}{t.get('mse', float('nan')):>9.4f}{t.get('fab', float('nan')):>7.2f}"
              f"{(r['train_s'] or 0):>8.0f}")


def plot(record: dict, path: Path) -> None:
    """Left: every config with the fixed points A{b}; right: the configs alone, labelled (runs
    at the same point, e.g. those that never left Q2B's initial choice, share one label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    colours = {"default": "black", "lam": "tab:red", "M": "tab:blue", "m": "tab:green",
               "lr": "tab:purple", "optimizer": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1, 1.5]})
    for name, entry in record["fixed"].items():
        h = entry["heldout"]
        axes[0].errorbar(h["fab"], h["mse"], yerr=h["mse_se"], fmt="s", color="grey", capsize=3)
        axes[0].annotate(name, (h["fab"], h["mse"]), textcoords="offset points", xytext=(6, 4),
                         fontsize=8, color="grey")
    defaults = sorted((e["iters"], e["heldout"]["fab"], e["heldout"]["mse"])
                      for e in record["runs"].values() if e["factor"] == "default")
    labels: dict[tuple, list[str]] = {}
    for ax in axes:
        if len(defaults) > 1:
            ax.plot([d[1] for d in defaults], [d[2] for d in defaults], color="black", lw=0.8,
                    alpha=0.5)
        seen = set()
        for name, entry in record["runs"].items():
            h, factor = entry["heldout"], entry["factor"]
            ax.errorbar(h["fab"], h["mse"], xerr=h["fab_se"], yerr=h["mse_se"], fmt="o", ms=4,
                        color=colours.get(factor, "k"), capsize=2, elinewidth=0.8,
                        label=None if factor in seen else factor)
            seen.add(factor)
            if ax is axes[1]:
                labels.setdefault((round(h["fab"], 4), round(h["mse"], 6)), []).append(
                    (name, factor))
    for (fab, mse), named in labels.items():
        alone = len(named) == 1  # a shared point: its names to the left, in black
        axes[1].annotate(" = ".join(n for n, _ in named), (fab, mse), textcoords="offset points",
                         xytext=(5, 3) if alone else (-6, 6), ha="left" if alone else "right",
                         fontsize=7, color=colours.get(named[0][1], "k") if alone else "k")
    s = record.get("sizes", {})
    axes[0].set(xlabel="held-out FAB (mean bits of the dynamic units)",
                ylabel="held-out ε-MSE to FP (mean per prompt ± SE)", yscale="log",
                title=f"Q2B {s.get('bits')} and fixed bits")
    axes[1].set(xlabel="held-out FAB", title=f"the configs (name@iterations); "
                f"{s.get('val_prompts')} validation prompts")
    for ax in axes:
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


# -- main -------------------------------------------------------------------------------------


def sizes(args, base: TrainQLIPConfig) -> dict:
    return {"bits": list(base.q2b.bits), "steps": args.steps, "guidance": args.guidance,
            "num_prompts": args.num_prompts, "q2b_prompts": args.q2b_prompts,
            "val_prompts": args.val_prompts, "t2q_iters": args.t2q_iters,
            "batch_size": args.batch_size,
            "quantized": str(args.quantized),
            "quantized_state": file_digest(Path(args.quantized) / STATE_FILE)}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:  # the table and plot again from the record (e.g. after a code change)
        record = load_record(out)
        summarise(record)
        write_atomic(out, json.dumps(record, indent=1))
        print_table(record)
        if args.plot:
            plot(record, Path(args.plot))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = job_config(args)
    record = load_record(out)
    shared = sizes(args, base)  # what every result depends on (a run's own settings aside)
    if record.get("sizes") not in (None, shared):
        print(f"{out}: other sizes than now; configs are recomputed where their key differs")
    record["sizes"] = shared
    call = {"iters": args.iters, "default_evals": args.default_evals, "only": args.only,
            "seconds": {}}
    record.setdefault("calls", []).append(call)
    record["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}
    clock = time.perf_counter()
    inputs = prepare_q2b(base)
    work = base.work
    with FolderLock(work, "q2b_sweep"):
        setup = time.perf_counter()
        units = quant_units(inputs.pipe.unet)
        targets = cached_targets(inputs.pipe.unet, inputs.rows, units,
                                 work / f"q2b_sweep_train_eps_{inputs.rows_digest[:12]}.safetensors")
        val = validation_set(args, base, inputs, work)
        train_texts = set(inputs.texts)
        record["validation"] = {"prompts": len(val.texts), "rows": len(val.rows),
                                "texts_also_in_training": sum(t in train_texts for t in val.texts),
                                "first_texts": val.texts[:5]}
        record["t2q"] = inputs.t2q.metrics
        call["seconds"]["setup"] = round(time.perf_counter() - clock, 1)  # stages + the below
        call["seconds"]["targets_and_validation"] = round(time.perf_counter() - setup, 1)

        def save():
            summarise(record)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, json.dumps(record, indent=1))

        for b in base.q2b.bits:  # the fixed points: every dynamic unit at b
            key = digest([shared, "fixed", b])
            if record["fixed"].get(f"A{b}", {}).get("key") == key:
                continue
            start = time.perf_counter()
            bits = torch.full((len(val.rows), sum(u.dynamic for u in units.values())), b)
            record["fixed"][f"A{b}"] = {"key": key, "heldout": score(
                inputs.pipe.unet, units, bits, val, args.eval_batch),
                "eval_seconds": round(time.perf_counter() - start, 1)}
            save()
        runs = sweep_runs(args, base)
        for run in tqdm(runs, desc="sweep", disable=args.no_progress):
            settings = {"q2b": run.q2b.to_dict(), "train": asdict(replace(run.train, progress=True))}
            key = digest([shared, settings])
            if record["runs"].get(run.name, {}).get("key") == key:
                continue
            folder = work / "q2b_sweep" / run_folder(run.name, shared, settings)
            q2b, history, seconds, resumed = train_run(run, inputs, targets, folder,
                                                       not args.no_progress)
            stem = run.name.split("@")[0]
            earlier = record["runs"].get(f"{stem}@{resumed}", {}) if resumed else {}
            total = seconds + earlier.get("train_seconds_total", 0.0)
            start = time.perf_counter()
            heldout = score(inputs.pipe.unet, units, q2b_bits(q2b, val), val, args.eval_batch)
            record["runs"][run.name] = {
                "key": key, "factor": run.factor, **settings, "iters": len(history),
                "train_tail": tail(history), "train_seconds": round(seconds, 1),
                "resumed_from_iteration": resumed, "train_seconds_total": round(total, 1), "heldout": heldout,
                "eval_seconds": round(time.perf_counter() - start, 1)}
            save()
        call["seconds"]["total"] = round(time.perf_counter() - clock, 1)
        save()
    print_table(record)
    if args.plot:
        plot(record, Path(args.plot))


if __name__ == "__main__":
    main()
