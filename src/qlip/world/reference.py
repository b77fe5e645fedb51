"""Loading the reference world's committed text-to-image model (the toolkit's default model).

Example:
    >>> pipe = load_reference_pipeline("cuda")
    >>> image = pipe("a red circle in the top left", num_inference_steps=25,
    ...              guidance_scale=4.0).images[0]  # 64x64 PIL image
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

REFERENCE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "reference-sd"


def load_reference_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: str | Path = REFERENCE_MODEL_DIR,
) -> StableDiffusionPipeline:
    """Load the committed diffusers folder (fp16 weights), cast to ``dtype``, on ``device``."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no reference model at {model_dir} (model_index.json missing); train and export it "
            "with `python -m qlip.world.train vae|unet|export` (see docs/reference-world.md)"
        )
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
