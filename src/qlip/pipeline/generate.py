"""Generation with a quantized UNet: every step, the bit policy sets each unit's bits (the batch's
maximum, or each image its own), per-step tables are told the step index, and the ledger accounts
the cost per image from the bits each image ran at."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..files import LOCK_FILE, load_tensors, save_image_atomic, save_tensors, write_atomic
from ..nn import QuantUnit, quant_units, verify_calibrated
from ..policies import BitPolicy, FixedBits
from .accounting import BitLedger, ImageReport, MacCounter
from .prompts import check_prompts, encode_prompt_batch

BATCH_MODES = ("max", "per_image")


@dataclass
class GenerationConfig:
    steps: int = 25
    guidance: float = 7.5
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    truncate: bool = False  # allow prompts over the tokenizer's limit (cut, as CLIP pipelines do)
    allow_empty: bool = False  # allow empty prompts (unconditional generation)
    # "max": each layer runs the batch at its maximum over the batch's prompts (the paper's
    # practice); "per_image": each prompt at its own bits (a simulation of per-prompt precision)
    batch_mode: str = "max"

    def __post_init__(self):
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}; got {self.batch_mode!r}")


@dataclass
class GenerationResult:
    """Images, their cost reports and the bits every unit ran at at every step:
    ``bits[i, s, u]`` (and ``requested``: what the policy asked for image i alone) for unit
    ``unit_names[u]`` (every quantized unit, fixed ones at their own bits; 32 = FP)."""

    images: list[Image.Image] = field(default_factory=list)
    reports: list[ImageReport] = field(default_factory=list)
    unit_names: list[str] = field(default_factory=list)
    bits: np.ndarray | None = None  # [images, steps, units] uint8
    requested: np.ndarray | None = None  # [images, steps, units] uint8

    def add_bits(self, ledger: BitLedger, count: int) -> None:
        """Append one batch's bits from its ledger."""
        run, requested = ledger.unit_bits(count)
        self.unit_names = list(run)
        parts = [np.ascontiguousarray(np.stack([t[n] for n in run], -1).transpose(1, 0, 2),
                                      np.uint8) for t in (run, requested)]  # [S, n] -> [n, S, U]
        if self.bits is None:
            self.bits, self.requested = parts
        else:
            self.bits = np.concatenate([self.bits, parts[0]])
            self.requested = np.concatenate([self.requested, parts[1]])


def dynamic_units(units: dict[str, QuantUnit]) -> dict[str, QuantUnit]:
    return {n: u for n, u in units.items() if u.dynamic}


def unet_calls(pipe, steps: int) -> int:
    """How many UNet calls the pipeline's scheduler makes for ``steps`` sampling steps (PNDM,
    SD 1.x's default, makes one more: it repeats a timestep)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def check_step_tables(units: dict[str, QuantUnit], steps: int, calls: int | None = None) -> None:
    """Per-step tables have one row per sampling step (UNet call): refuse a run that makes more
    calls than a table has rows, up front. ``calls``: the run's UNet calls (default ``steps``)."""
    calls = steps if calls is None else calls
    for name, unit in units.items():
        rows = unit.step_rows()
        if rows is not None and calls > rows:
            raise ValueError(
                f"{name}: its activation quantizers hold a per-step table of {rows} steps (a "
                f"row per UNet call) but {steps} steps make {calls} UNet calls with this "
                "scheduler; sample with the scheduler and number of steps it was calibrated with"
            )


class StepController:
    """The one place that counts denoising steps and applies the policy's decision: a UNet forward
    pre-hook. Every dynamic unit reads its choice from one shared table and every unit its step
    index from one shared tensor, so a step costs one policy call and a few small device ops —
    no host sync, nothing that would recompile a compiled UNet."""

    def __init__(
        self, unet: nn.Module, policy: BitPolicy | None, units: dict[str, QuantUnit],
        batch_mode: str = "max", num_images: int = 1, count_macs: bool = True,
    ):
        self.units = units
        rows = [r for r in (u.step_rows() for u in units.values()) if r is not None]
        self.max_steps = min(rows) if rows else None  # per-step tables: no call past their rows
        self.dynamic = list(dynamic_units(units).values())
        self.policy = policy if self.dynamic else None
        self.ledger = BitLedger(units, list(dynamic_units(units)), batch_mode)
        self.per_image = batch_mode == "per_image"
        self.step = 0
        device = next(unet.parameters()).device
        self._step = torch.zeros(1, dtype=torch.long, device=device)
        for unit in units.values():
            unit.bind_step(self._step)
        if self.policy is not None:
            count = len(self.dynamic)
            self._lookup = torch.stack([u.slot_lookup() for u in self.dynamic])
            rows = torch.arange(count, device=device)
            self._rows = rows[:, None] if self.per_image else rows
            shape = (count, num_images) if self.per_image else (count, 1)
            self._choices = torch.zeros(shape, dtype=torch.long, device=device)
            for j, unit in enumerate(self.dynamic):
                unit.bind_bits(self._choices, j)
        self._counter: MacCounter | None = MacCounter(unet) if count_macs else None
        self._handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def detach(self) -> None:
        """Stop running as the UNet's hook (a caller that drives a compiled forward calls the
        controller itself before each step)."""
        self._handle.remove()

    def __call__(self, module, args, kwargs):
        if self.max_steps is not None and self.step >= self.max_steps:
            raise RuntimeError(f"UNet call {self.step + 1} of this run has no row in the per-step "
                               f"activation tables ({self.max_steps} rows); sample with the "
                               "scheduler and steps the model was calibrated with")
        self._step.fill_(self.step)
        if self.policy is not None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            requested = self.policy.bits(self.step, torch.as_tensor(timestep))  # [B, U]
            requested = requested.to(self._step.device, non_blocking=True)
            run = requested.T if self.per_image else requested.amax(dim=0)  # [U, n] or [U]
            slots = self._lookup[self._rows, run]  # [U, n] or [U]
            self._choices.copy_(slots if self.per_image else slots[:, None])
            self.ledger.record_step(run, requested)
        else:
            self.ledger.record_step()
        if self.step == 0 and self._counter is not None:
            self._counter.__enter__()
        elif self._counter is not None:
            self._close_counter()
        self.step += 1

    def _close_counter(self) -> None:
        self._counter.__exit__()
        self.ledger.sites = self._counter.sites
        self._counter = None

    def close(self) -> None:
        if self._counter is not None:  # a single-step run: the first call's sites are complete
            self._close_counter()
        self._handle.remove()
        for unit in self.units.values():  # back to the units' own bits and steps
            unit.bind_step(None)
        for unit in self.dynamic:
            unit.bind_bits(None, 0)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    policy: BitPolicy | None = None,
    config: GenerationConfig | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate one image per (prompt, seed) with the pipeline's (quantized) UNet.

    >>> result = generate(pipe, ["a red circle"], seeds=[0], policy=FixedBits(8))  # doctest: +SKIP
    >>> result.reports[0].fab
    8.0
    """
    config = config or GenerationConfig()
    prompts = list(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    check_prompts(pipe, prompts, config.truncate, config.allow_empty)
    units = quant_units(pipe.unet)
    check_step_tables(units, config.steps, unet_calls(pipe, config.steps))
    verify_calibrated(units)
    if units and policy is None:
        policy = FixedBits(next(iter(units.values())).default_bits)
    if policy is not None:
        policy.bind({n: u.options for n, u in dynamic_units(units).items()})
    device = pipe.unet.device
    result = GenerationResult()
    bar = tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress)
    for start, batch in _batches(prompts, config.batch_size):
        batch_seeds = list(seeds[start : start + len(batch)])
        if policy is not None:
            policy.begin(encode_prompt_batch(pipe, batch), config.steps)
        controller = StepController(pipe.unet, policy, units, config.batch_mode, len(batch))
        try:
            out = pipe(
                batch,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=[torch.Generator(device).manual_seed(s) for s in batch_seeds],
            )
        finally:
            controller.close()
        cfg = 2 if config.guidance > 1.0 else 1
        result.images.extend(out.images)
        result.reports.extend(controller.ledger.reports(batch, batch_seeds, cfg))
        if units:
            result.add_bits(controller.ledger, len(batch))
        bar.update(len(batch))
    bar.close()
    return result


BITS_FILE = "bits.safetensors"


def save_generation(result: GenerationResult, out_dir: str | Path, header: dict | None = None
                    ) -> Path:
    """Write ``0000.png``…, ``report.json`` (``header`` + one entry per image: its cost report
    and FAB) and, for a quantized model, ``bits.safetensors``: ``bits`` and ``requested``
    ``[images, steps, units]`` uint8, the unit names in its metadata (``units``, JSON) and in
    ``report.json``. Image i's bits are row i (``report.json``: ``"bits_row"``).

    >>> save_generation(generate(pipe, prompts, seeds, policy), "runs/images")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (image, report) in enumerate(zip(result.images, result.reports)):
        name = f"{i:04d}.png"
        save_image_atomic(image, out / name)
        entries.append({"image": name, **report.to_dict(),
                        **({"bits_row": i} if result.bits is not None else {})})
    document = {**(header or {}), "images": entries}
    if result.bits is not None:
        save_bits(out / BITS_FILE, result.bits, result.requested, result.unit_names)
        document |= {"bits_file": BITS_FILE, "bits_shape": list(result.bits.shape),
                     "units": result.unit_names}
    path = out / REPORT_FILE
    write_atomic(path, json.dumps(document, indent=2))
    _remove_stale(out, {e["image"] for e in entries} | ({BITS_FILE} if result.bits is not None
                                                          else set()))
    return path


REPORT_FILE = "report.json"
_IMAGE_NAME = re.compile(r"^\d{4,}\.png$")


def _generation_files(out: Path) -> list[Path]:
    """The files in ``out`` that `qlip generate` writes (images, report, bits)."""
    return [p for p in out.iterdir()
            if p.name in (REPORT_FILE, BITS_FILE) or _IMAGE_NAME.match(p.name)]


def _remove_stale(out: Path, kept: set[str]) -> None:
    """An earlier run's images and bits that this run did not write over: they would sit beside
    a report that does not list them."""
    for path in _generation_files(out):
        if path.name not in kept and path.name != REPORT_FILE:
            path.unlink(missing_ok=True)


def check_generation_folder(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Before any work: refuse an output folder that holds files (another run's images, or
    anything else) unless ``overwrite``; with ``overwrite`` the earlier run's images and bits
    are replaced by :func:`save_generation` (other files are left alone)."""
    out = Path(out_dir)
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"--out {out} is not empty ({shown}); choose an empty or new folder, or "
                         "pass --overwrite to replace the earlier run's images and report")
    return out


def save_bits(path: str | Path, bits: np.ndarray, requested: np.ndarray,
              unit_names: list[str], index: np.ndarray | None = None) -> None:
    """``bits`` / ``requested`` [images, steps, units] uint8 (and the images' ``index``) as
    safetensors, the unit names in the metadata; written atomically."""
    tensors = {"bits": torch.from_numpy(np.ascontiguousarray(bits, np.uint8)),
               "requested": torch.from_numpy(np.ascontiguousarray(requested, np.uint8))}
    if index is not None:
        tensors["index"] = torch.as_tensor(np.asarray(index, np.int64))
    save_tensors(tensors, path, metadata={"units": json.dumps(list(unit_names))})


def read_bits(path: str | Path) -> dict:
    """What :func:`save_bits` wrote: ``bits``, ``requested`` (and ``index``) arrays, ``units``."""
    tensors, meta = load_tensors(path, "delete it and generate the images again", "numpy")
    try:
        return tensors | {"units": json.loads(meta["units"])}
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a qlip bits file (no unit names); delete it and "
                         "generate the images again") from err


def load_generation_bits(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(bits, requested, unit names) of a folder :func:`save_generation` (or `qlip eval`) wrote."""
    path = Path(out_dir) / BITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate or evaluate with a quantized model "
                                "(`qlip generate/eval --quantized DIR`) first")
    table = read_bits(path)
    return table["bits"], table["requested"], table["units"]
