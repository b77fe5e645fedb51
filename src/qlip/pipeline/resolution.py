"""The image size a pipeline call gets."""

from __future__ import annotations


def pipeline_resolution(pipe, height: int | None, width: int | None
                        ) -> tuple[int | None, int | None]:
    """``(height, width)`` for a pipeline call: as given, with a missing one taken from the
    pipeline's own resolution (the UNet's ``sample_size`` times the VAE's scale factor). A
    diffusers Stable Diffusion pipeline given only one of the two silently drops it and uses
    its own resolution for both (diffusers 0.42), so a lone ``--height`` would not reach the
    images. Both None: None, the pipeline's own."""
    if (height is None) == (width is None):
        return height, width
    size = pipe.unet.config.sample_size
    rows, cols = (size, size) if isinstance(size, int) else tuple(size)
    scale = pipe.vae_scale_factor
    return (height if height is not None else rows * scale,
            width if width is not None else cols * scale)
