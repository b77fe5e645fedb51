"""`qlip per-layer`: the best fixed per-layer bit assignment at a target FAB (issue 12's third
control; the method is :mod:`qlip.methods.bit_assignment`). The rows are FP trajectories of the
training prompts, cached as `qlip train-qlip` caches them: with the same ``--work-dir``, steps,
guidance, seed, chunk and prompt count, QLIP's own Q2B rows are reused, not sampled again.

The damage table (every layer's error at each lower option: the costly part, one UNet pass over
the rows per layer and option) does not depend on the target. It is cached in the work folder
under the fingerprint of what made it (the quantized state, the options, the layers, the rows),
so a second run at another target only redoes the greedy, and ``damage_only`` measures it ahead
of time (beside other work, before QLIP's FAB is known).

>>> config = PerLayerConfig("runs/q_w4", out="runs/per_layer.json", target_fab=4.42)  # doctest: +SKIP
>>> run_per_layer(config)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..cli_args import output_folder
from ..files import FolderLock, load_tensors, note, save_tensors
from ..methods.bit_assignment import (
    Budget,
    check_target,
    greedy_assignment,
    save_assignment,
    unit_damage,
)
from ..methods.unet_inputs import call_unet
from ..nn import QuantConfig, QuantUnit, fp_bits, quant_units
from ..pipeline import MacCounter, load_pipeline, load_quantized
from ..pipeline.cache import digest, file_digest
from ..pipeline.qlip_data import FPRunConfig, trajectory_data
from ..pipeline.saving import STATE_FILE, check_quantized_folder
from ..quant import check_bits

WEIGHTINGS = ("fab", "weighted")  # the ledger's FAB; its MAC-weighted bits


@dataclass
class PerLayerConfig:
    """Everything `qlip per-layer` does; each field is one flag."""

    quantized: str = ""  # a folder made by `qlip quantize` (or train-qlip's copy of one)
    out: str = ""  # the assignment file (JSON)
    target_fab: float = 0.0
    damage_only: bool = False  # measure and cache the damage table; no target, no assignment
    bits: tuple[int, ...] = ()  # the options, low → high; () = the model's activation bank
    weighting: str = "fab"
    attention_bits: int | None = None  # dynamic units outside the measure; None: the top option
    model: str = "reference"
    device: str = "cpu"
    prompts: str | None = None  # a file; None: the reference world's training prompts
    num_prompts: int = 128  # their FP trajectories are the rows (train-qlip's --q2b-prompts)
    prompt_seed: int = 0
    max_rows: int = 1024  # rows measured, spread evenly over the trajectories' rows
    work_dir: str | None = None  # the trajectories' cache (default: QUANTIZED/qlip_work)
    sampling: FPRunConfig = field(default_factory=FPRunConfig)
    progress: bool = True

    def __post_init__(self):
        self.bits = tuple(int(b) for b in self.bits)
        if not self.quantized:
            raise ValueError("qlip per-layer needs --quantized DIR")
        if not self.damage_only and (not self.out or self.target_fab <= 0):
            raise ValueError("qlip per-layer needs --target-fab and --out FILE (or --damage-only "
                             "to measure and cache the damage table alone)")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        if self.bits and (len(self.bits) < 2 or list(self.bits) != sorted(set(self.bits))):
            raise ValueError(f"--bits must be at least two distinct widths, low to high; got "
                             f"{list(self.bits)}")
        for b in self.bits:
            check_bits(b, "--bits")
        if self.num_prompts < 1 or self.max_rows < 1:
            raise ValueError("--num-prompts and --max-rows must be at least 1")

    @property
    def work(self) -> Path:
        return Path(self.work_dir or Path(self.quantized) / "qlip_work")


def check_inputs(config: PerLayerConfig) -> tuple[dict, tuple[int, ...]]:
    """Everything that needs no model: the folder, the options, the output path. Returns the
    folder's config and the options."""
    meta = check_quantized_folder(config.quantized)
    bank = QuantConfig.from_dict(meta["quant_config"]).abits_options
    options = config.bits or tuple(sorted(bank))
    missing = sorted(set(options) - set(bank))
    if missing:
        raise ValueError(f"--bits {','.join(map(str, options))}: {missing} not in the activation "
                         f"bank of {config.quantized} {list(bank)}; choose among them")
    if len(options) < 2:
        raise ValueError(f"{config.quantized} has one activation option {list(bank)}: nothing to "
                         "assign; quantize with --abits-options")
    if config.attention_bits is not None and config.attention_bits not in bank:
        raise ValueError(f"--attention-bits {config.attention_bits} is not in the bank "
                         f"{list(bank)}")
    if config.prompts is None and config.model != "reference":
        raise ValueError("--prompts FILE is needed for a model other than the reference model")
    if config.prompts is not None and not Path(config.prompts).is_file():
        raise FileNotFoundError(f"--prompts {config.prompts}: no such file")
    if config.damage_only:
        return meta, options
    out = Path(config.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path (e.g. {out}/per_layer.json)")
    output_folder(str(out.parent), "--out (its folder)")
    return meta, options


def budget(units: dict[str, QuantUnit], greedy: list[str], weighting: str,
           macs: dict[str, int]) -> Budget:
    """The ledger's measure over the quantized Linear/Conv layers: FAB (each layer 1) or the
    MAC-weighted bits; fixed layers enter at their own bits, attention not at all."""
    weight = (lambda n: 1.0) if weighting == "fab" else (lambda n: float(macs.get(n, 0)))
    layers = [n for n, u in units.items() if u.fab_member]
    fixed = sum(weight(n) * fp_bits(units[n].default_bits) for n in layers if n not in greedy)
    weights = [weight(n) if units[n].fab_member else 0.0 for n in greedy]
    return Budget(weights, fixed, sum(weight(n) for n in layers))


def _unit_macs(unet, rows) -> dict[str, int]:
    counter = MacCounter(unet)
    with counter, torch.no_grad():
        call_unet(unet, rows.subset(torch.arange(1)).inputs())
    return {s.unit: s.macs for s in counter.sites if s.unit is not None}


def _training_texts(config: PerLayerConfig) -> list[str]:
    if config.prompts is not None:
        from ..cli_args import read_prompt_file

        texts = read_prompt_file(config.prompts)
        if len(texts) < config.num_prompts:
            raise ValueError(f"--prompts {config.prompts} holds {len(texts)} prompts; "
                             f"--num-prompts {config.num_prompts} needs that many")
        return texts[: config.num_prompts]
    from ..world.domain import heldout_free_prompts

    return [p.text for p in heldout_free_prompts(config.num_prompts, config.prompt_seed)]


DAMAGE_REMEDY = "delete it (the damage table is measured again)"


def damage_path(config: PerLayerConfig, fingerprint: dict) -> Path:
    """Where the work folder caches the damage table of ``fingerprint``."""
    return config.work / "per_layer_damage" / f"{digest(fingerprint)}.safetensors"


def cached_damage(config: PerLayerConfig, fingerprint: dict, measure: Callable[[], torch.Tensor],
                  log: Callable[[str], None]) -> torch.Tensor:
    """The damage table of ``fingerprint`` from the work folder's cache, else ``measure()``d and
    cached (atomically; a file of other inputs, or not a damage table, is measured again)."""
    path = damage_path(config, fingerprint)
    if path.is_file():
        tensors, meta = load_tensors(path, DAMAGE_REMEDY)
        if "damage" in tensors and meta.get("fingerprint") == json.dumps(fingerprint,
                                                                          sort_keys=True):
            log(f"damage: reusing {path}")
            return tensors["damage"].double()
        note(f"{path} is not the damage table of these inputs: measuring the damage again")
    damage = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({"damage": damage}, path,
                 {"fingerprint": json.dumps(fingerprint, sort_keys=True)})
    return damage


def run_per_layer(config: PerLayerConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every FAB layer's damage at each lower option (or reuse the cached table), run the
    greedy to the target and write the assignment file; returns its document. With
    ``damage_only``, stop after the table is cached and return ``{"damage_file": ...}``."""
    meta, options = check_inputs(config)
    texts = _training_texts(config)
    start = time.perf_counter()
    pipe = load_pipeline(config.model, config.device)
    load_quantized(pipe.unet, config.quantized)
    units = quant_units(pipe.unet)
    names = [n for n, u in units.items() if u.dynamic]
    lacking = [n for n in names if not set(options) <= set(units[n].options)]
    if lacking:
        raise ValueError(f"{lacking[0]} has no quantizer for some of {list(options)}")
    if config.weighting == "fab" and not config.damage_only:  # checked before any UNet runs
        check_target(config.target_fab, budget(units, names, "fab", {}), options)
    with FolderLock(output_folder(str(config.work), "--work-dir"), "qlip per-layer"):
        sampling = replace(config.sampling, progress=config.progress)
        base = {"model": config.model, "base": meta["base_fingerprint"]}  # as train-qlip's
        log(f"rows: FP trajectories of {len(texts)} prompts -> {config.work}/trajectories")
        rows, _ = trajectory_data(pipe, texts, config.work / "trajectories", sampling, base)
    if len(rows) > config.max_rows:
        rows = rows.subset(torch.linspace(0, len(rows) - 1, config.max_rows).round().long())
    plan = budget(units, names, config.weighting, _unit_macs(pipe.unet, rows))
    if not config.damage_only:
        check_target(config.target_fab, plan, options)
    measured = [n for n, w in zip(names, plan.weights) if w > 0]
    # everything the table depends on: the model, the options, the layers and the rows
    fingerprint = {"state": file_digest(Path(config.quantized) / STATE_FILE),
                   "options": list(options), "layers": digest(measured),
                   "texts": digest(texts), "sampling": sampling.fingerprint(),
                   "batch_size": sampling.batch_size, "rows": len(rows),
                   "max_rows": config.max_rows, "base": base}

    def measure() -> torch.Tensor:
        log(f"damage: {len(measured)} layers x {len(options) - 1} lower options on {len(rows)} "
            "rows")
        return unit_damage(pipe.unet, units, rows, measured, options, sampling.batch_size,
                           config.progress)

    damage = cached_damage(config, fingerprint, measure, log)
    if config.damage_only:
        path = damage_path(config, fingerprint)
        log(f"damage table cached in {path}: a run with --target-fab reuses it")
        return {"damage_file": str(path)}
    result = greedy_assignment(damage, options, Budget([w for w in plan.weights if w > 0],
                                                      plan.fixed, plan.total),
                               config.target_fab, measured)
    top = options[-1] if config.attention_bits is None else config.attention_bits
    chosen = dict(zip(measured, result.bits))
    bits = {n: chosen.get(n, top) for n in names}
    record = {
        "quantized": {"folder": str(config.quantized),
                      "state_digest": file_digest(Path(config.quantized) / STATE_FILE)},
        "options": list(options), "weighting": config.weighting,
        "target": config.target_fab, "reached": result.measure,
        "attention_bits": top, "rows": len(rows), "prompts": len(texts),
        "baseline_mse": float(damage[0, -1]) if len(measured) else None,
        "damage": {n: dict(zip(map(str, options), map(float, damage[j])))
                   for j, n in enumerate(measured)},
        "moves": result.moves, "seconds": round(time.perf_counter() - start, 1),
        "config": asdict(config),
    }
    save_assignment(config.out, bits, record)
    log(f"per-layer assignment: {config.weighting} {result.measure:.3f} (target "
        f"{config.target_fab:g}) after {len(result.moves)} moves; written to {config.out}")
    return {"bits": bits, **record}
