"""A pipeline made ready to sample a quantized model: the saved state loaded onto its UNet, PTQD's
scheduler wrapper applied when the model carries its statistics, and the bit policy chosen. The
command lines (`qlip generate`, `qlip eval`) only map their flags onto this."""

from __future__ import annotations

from pathlib import Path

from ..methods.qlip import has_qlip, load_qlip
from ..nn import pack_weights
from ..policies import BitPolicy, FixedBits, QLIPPolicy
from .ptqd_sampling import apply_saved_correction
from .saving import QuantizedInfo, load_quantized


def load_for_sampling(
    pipe, quantized: str | Path | None = None, abits: int | None = None,
    packed_weights: bool = False,
) -> BitPolicy | None:
    """Load the quantized model folder ``quantized`` onto ``pipe.unet`` (in place), wrap the
    scheduler with PTQD's correction when the folder holds PTQD statistics, and return the bit
    policy to sample with: ``abits`` for every unit; else QLIP when the folder holds a trained
    T2Q/Q2B (``qlip train-qlip``); else the model's own ``abits``. Without
    ``quantized`` the pipeline stays full precision and the policy is None. ``packed_weights``
    keeps every layer's weights of at most 4 bits as codes two per byte and frees its FP weight
    (``qlip.nn.pack_weights``): the same images in less memory, each layer dequantizing its
    weight at every call.

    >>> policy = load_for_sampling(pipe, "runs/w4a8", abits=16)  # doctest: +SKIP
    >>> result = generate(pipe, ["a red circle"], seeds=[0], policy=policy)  # doctest: +SKIP
    """
    check_sampling_flags(quantized, abits, packed_weights)
    if not quantized:
        return None
    info = load_quantized(pipe.unet, quantized)
    if packed_weights:
        pack_weights(pipe.unet)
    apply_saved_correction(pipe, info.extra)
    return saved_policy(pipe, quantized, info, abits)


def check_sampling_flags(quantized, abits: int | None = None, packed_weights: bool = False) -> None:
    """Refuse, before any work, sampling options that need a quantized model without one."""
    if not quantized and (abits or packed_weights):
        flag = "--abits" if abits else "--packed-weights"
        raise ValueError(f"{flag} needs --quantized DIR, a quantized model folder (made by "
                         "`qlip quantize`)")


def saved_policy(pipe, quantized: str | Path | None, info: QuantizedInfo, abits: int | None = None
                 ) -> BitPolicy:
    """``abits`` for every unit; else QLIP when the folder ``quantized`` holds a trained T2Q/Q2B;
    else the model's own ``abits``."""
    if not abits and quantized and has_qlip(quantized):
        return QLIPPolicy(load_qlip(quantized, pipe.unet.device))
    return FixedBits(abits or info.config.abits)
