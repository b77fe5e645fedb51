"""Loading a text-to-image pipeline from a registered name (the embedded ``reference`` model), a
local folder or a hub id, with clear errors for what is not one.

Named models are a registry of loaders (``register_model``); a loader given as
``"module:function"`` is imported on first use, so this layer never imports the layers that
provide models (the reference world registers itself here by name only).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

REFERENCE = "reference"
ModelLoader = Callable[..., object]  # loader(device=..., dtype=...) -> pipeline
_MODELS: dict[str, str | ModelLoader] = {
    REFERENCE: "qlip.world.reference:load_reference_pipeline",
}
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


def register_model(name: str, loader: str | ModelLoader) -> None:
    """Make ``load_pipeline(name)`` call ``loader(device=..., dtype=...)``; ``loader`` is a callable
    or ``"package.module:function"`` (imported when first loaded). A name registered again is
    replaced.

    >>> register_model("tiny", "qlip.testing:load_tiny_pipeline")  # doctest: +SKIP
    >>> pipe = load_pipeline("tiny")  # doctest: +SKIP
    """
    if not name or "/" in name or name.startswith((".", "~")):
        raise ValueError(f"a model name must not look like a path or a hub id; got {name!r}")
    if isinstance(loader, str) and loader.count(":") != 1:
        raise ValueError(f"a loader by name is 'package.module:function'; got {loader!r}")
    _MODELS[name] = loader


def registered_models() -> list[str]:
    """The names ``load_pipeline`` knows besides folders and hub ids."""
    return sorted(_MODELS)


def _load_named(name: str, device: str, dtype: torch.dtype):
    loader = _MODELS[name]
    try:
        if isinstance(loader, str):
            module, _, function = loader.partition(":")
            loader = getattr(importlib.import_module(module), function)
        return loader(device=device, dtype=dtype)
    except (ImportError, FileNotFoundError) as err:
        raise ModelLoadError(f"the registered model {name!r} is not available: {err}") from err
    except AttributeError as err:
        if callable(loader):
            raise
        raise ModelLoadError(f"the loader {_MODELS[name]!r} of model {name!r} does not exist: "
                             f"{err}") from err


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers text-to-image pipeline from a registered name (``reference``, see
    ``register_model``), a local folder or a hub id.

    >>> pipe = load_pipeline("reference", "cuda")  # doctest: +SKIP
    """
    from diffusers import DiffusionPipeline

    if model in _MODELS:
        pipe = _load_named(model, device, dtype)
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
            raise ModelLoadError(f"no such model folder: {path} (nor a registered model: "
                                 f"{', '.join(registered_models())})")
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
