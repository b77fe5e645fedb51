"""Generation with a quantized UNet, as a user of :mod:`.session`: each batch is one plain
pipeline call inside a sampling session (the bit policy every step, per-step tables, the cost
ledger); this module adds prompts, seeds, batches and the files `qlip generate` writes."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..files import LOCK_FILE, load_tensors, save_image_atomic, save_tensors, write_atomic
from ..nn import quant_units
from ..policies import BitPolicy
from .accounting import ImageReport
from .compiled import check_compile_mode, compiled_forward
from .prompts import check_prompts
from .resolution import pipeline_resolution
from .session import (  # noqa: F401  (StepController & co. are imported from here too)
    BATCH_MODES,
    SamplingRecord,
    StepController,
    check_step_tables,
    dynamic_units,
    sampling_session,
    unet_calls,
)


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
    # torch.compile's mode for the UNet (compiled.COMPILE_MODES; None: eager): every UNet call
    # but each run's first (the one whose MACs are counted) runs compiled
    compile: str | None = None

    def __post_init__(self):
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}; got {self.batch_mode!r}")
        check_compile_mode(self.compile)


@dataclass
class GenerationResult:
    """Images, their cost reports and the bits every unit ran at at every UNet call:
    ``bits[i, s, u]`` (and ``requested``: what the policy asked for image i alone) for unit
    ``unit_names[u]`` (every quantized unit, fixed ones at their own bits; 32 = FP)."""

    images: list[Image.Image] = field(default_factory=list)
    reports: list[ImageReport] = field(default_factory=list)
    unit_names: list[str] = field(default_factory=list)
    bits: np.ndarray | None = None  # [images, steps, units] uint8
    requested: np.ndarray | None = None  # [images, steps, units] uint8

    def add(self, images: list[Image.Image], record: SamplingRecord) -> None:
        """Append one pipeline call's images and what it ran (its reports and bits)."""
        self.images.extend(images)
        self.reports.extend(record.reports)
        if record.bits is None:
            return
        self.unit_names = record.unit_names
        if self.bits is None:
            self.bits, self.requested = record.bits, record.requested
        else:
            self.bits = np.concatenate([self.bits, record.bits])
            self.requested = np.concatenate([self.requested, record.requested])


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
    check_step_tables(quant_units(pipe.unet), config.steps, unet_calls(pipe, config.steps))
    device = pipe.unet.device
    height, width = pipeline_resolution(pipe, config.height, config.width)
    result = GenerationResult()
    bar = tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress)
    with (sampling_session(pipe, policy, config.batch_mode) as session,
          compiled_forward(pipe.unet, config.compile, session.counting_macs)):
        for start, batch in _batches(prompts, config.batch_size):
            batch_seeds = list(seeds[start : start + len(batch)])
            session.last = None
            out = pipe(
                batch,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=height,
                width=width,
                generator=[torch.Generator(device).manual_seed(s) for s in batch_seeds],
            )
            record = session.last
            if record is None:
                raise RuntimeError("the pipeline call ended without finishing its sampling run")
            record.reports = [replace(r, prompt=p, seed=s)
                              for r, p, s in zip(record.reports, batch, batch_seeds)]
            result.add(out.images, record)
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
