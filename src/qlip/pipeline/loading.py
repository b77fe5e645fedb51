"""Loading a text-to-image pipeline from a local folder, a hub id or the embedded reference model,
with clear errors for what is not one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REFERENCE = "reference"
TEXT_TO_IMAGE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")


class ModelLoadError(ValueError):
    """The model argument does not name a usable text-to-image pipeline."""


def _check_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder saved "
            "with `pipeline.save_pretrained(...)`, a hub id, or `reference`"
        )
    parts = json.loads(index.read_text())
    missing = [p for p in TEXT_TO_IMAGE_PARTS if p not in parts]
    if missing:
        raise ModelLoadError(
            f"{path} holds a {parts.get('_class_name', 'pipeline')} without {', '.join(missing)}: "
            "not a text-to-image UNet pipeline (SD 1.x, BK-SDM, SDXL)"
        )


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers text-to-image pipeline from ``reference``, a local folder or a hub id."""
    from diffusers import DiffusionPipeline

    if model == REFERENCE:
        try:
            from ..world.reference import load_reference_pipeline

            pipe = load_reference_pipeline(device=device, dtype=dtype)
        except (ImportError, FileNotFoundError) as err:
            raise ModelLoadError(f"the embedded reference model is not available: {err}") from err
    else:
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelLoadError(f"{path} is a file; pass the pipeline's folder")
            _check_folder(path)
            source = str(path)
        elif _looks_like_hub_id(model):
            source = model
        else:
            raise ModelLoadError(f"no such model folder: {path}")
        try:
            pipe = DiffusionPipeline.from_pretrained(
                source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not load {model!r}: {str(err).splitlines()[0]}. For a hub id, download it "
                "on a machine with network access and pass the local folder"
            ) from err
        pipe = pipe.to(device)
    for part in ("unet", "text_encoder", "tokenizer"):
        if getattr(pipe, part, None) is None:
            raise ModelLoadError(f"{model!r} loaded as {type(pipe).__name__}, which has no {part}")
    pipe.set_progress_bar_config(disable=True)
    return pipe
