"""qlip: low-bit, prompt-conditioned quantization of text-to-image diffusion models.

The drop-in API for a loaded diffusers pipeline (``docs/dropin.md``):

>>> import qlip  # doctest: +SKIP
>>> qlip.attach_quantization(pipe, "runs/w4a8")  # doctest: +SKIP
>>> image = pipe("a red circle").images[0]  # doctest: +SKIP
>>> pipe.qlip.last.reports[0].fab  # doctest: +SKIP
>>> qlip.detach_quantization(pipe)  # doctest: +SKIP

This package is the public facade, the top layer: the names below are imported on first use, so
``import qlip.quant`` does not load diffusers.
"""

from .version import __version__

__all__ = ["__version__", "attach_quantization", "detach_quantization"]


def __getattr__(name: str):
    if name in ("attach_quantization", "detach_quantization"):
        from .pipeline import attach

        return getattr(attach, name)
    raise AttributeError(f"module 'qlip' has no attribute {name!r}")
