"""Quantization attached to a user's loaded pipeline, in the spirit of torchao's
``quantize_(model, config)`` and diffusers' ``apply_*`` hooks: one call quantizes the pipeline's
UNet (or loads a saved quantization onto it) and installs a :class:`~.session.SamplingSession`,
so that the user's own ``pipe(prompt, ...)`` runs the bit policy and the per-step tables,
applies PTQD's correction and leaves a cost report in ``pipe.qlip.last``; detaching gives the
pipeline back its own modules and scheduler (its FP outputs bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..nn import QuantUnit, quant_units
from ..policies import BitPolicy, FixedBits
from .ptqd_sampling import apply_saved_correction
from .quantize import QuantizeJob, run_quantize_job
from .quantized_model import saved_policy
from .saving import QuantizedInfo, check_quantized_folder, load_quantized
from .session import ATTACHED, SamplingRecord, SamplingSession, session_of


@dataclass
class _Original:
    """What attaching changes, kept to be put back."""

    layers: dict[str, nn.Module]
    processors: dict[str, object]
    requires_grad: dict[str, bool]
    scheduler: object

    @classmethod
    def of(cls, pipe) -> _Original:
        unet = pipe.unet
        layers = {n: m for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
        processors = dict(getattr(unet, "attn_processors", {}))
        grads = {n: p.requires_grad for n, p in unet.named_parameters()}
        return cls(layers, processors, grads, pipe.scheduler)

    def restore(self, pipe) -> None:
        unet = pipe.unet
        for name, module in self.layers.items():
            if unet.get_submodule(name) is not module:
                unet.set_submodule(name, module)
        if self.processors:
            unet.set_attn_processor(self.processors)
        for name, param in unet.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, param.requires_grad))
        pipe.scheduler = self.scheduler


@dataclass
class AttachedQuantization:
    """``pipe.qlip``: the quantization attached to a pipeline. ``last`` is the record of the
    latest ``pipe(...)`` call: ``last.reports[i]`` (FAB, MAC-weighted bits, BitOPs, steps of
    image i), ``last.bits`` ``[images, UNet calls, units]``.

    >>> pipe.qlip.last.reports[0].fab  # doctest: +SKIP
    >>> pipe.qlip.use(FixedBits(16), batch_mode="per_image")  # doctest: +SKIP
    """

    session: SamplingSession
    info: QuantizedInfo
    source: str  # the folder loaded, or the method run in place
    _original: _Original = field(repr=False)

    @property
    def units(self) -> dict[str, QuantUnit]:
        return self.session.units

    @property
    def last(self) -> SamplingRecord | None:
        return self.session.last

    @property
    def policy(self) -> BitPolicy | None:
        return self.session.policy

    @property
    def batch_mode(self) -> str:
        return self.session.batch_mode

    def use(self, policy: BitPolicy | int | None = None, batch_mode: str | None = None) -> None:
        """Sample the next calls with ``policy`` (an int: fixed bits) and ``batch_mode``."""
        self.session.use(FixedBits(policy) if isinstance(policy, int) else policy, batch_mode)


def attach_quantization(
    pipe,
    quantization: str | Path | QuantizeJob,
    calibration_prompts: Sequence[str] | None = None,
    *,
    abits: int | None = None,
    policy: BitPolicy | None = None,
    batch_mode: str = "max",
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> AttachedQuantization:
    """Quantize ``pipe`` in place and make its own calls sample the quantized model.

    ``quantization`` is a folder written by ``qlip quantize`` (or ``out_dir`` of an earlier
    attach; loaded onto this FP pipeline, PTQD's statistics and a trained QLIP included) or a
    :class:`QuantizeJob` run on ``calibration_prompts`` (saved to ``out_dir`` if given). The bit
    policy is ``policy``, else fixed ``abits``, else QLIP when the folder holds one, else the
    model's own bits. Returns ``pipe.qlip``; undo with :func:`detach_quantization`.

    >>> qlip.attach_quantization(pipe, QuantizeJob(quant=QuantConfig(wbits=4, abits=8)),
    ...                          ["a red circle", "two blue squares"])  # doctest: +SKIP
    >>> pipe("a red circle").images[0]  # doctest: +SKIP
    >>> pipe.qlip.last.reports[0].fab  # doctest: +SKIP
    8.0
    """
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no unet: qlip quantizes UNet pipelines "
                         "(SD 1.x, BK-SDM, SDXL)")
    if session_of(pipe) is not None:
        raise ValueError("this pipeline already has a quantization attached; call "
                         "qlip.detach_quantization(pipe) first")
    if quant_units(pipe.unet):
        raise ValueError("this pipeline's UNet is already quantized (not by attach); start from "
                         "the full-precision pipeline")
    if isinstance(quantization, QuantizeJob):
        if not calibration_prompts or isinstance(calibration_prompts, str):
            raise ValueError("quantizing needs calibration_prompts: a list of prompts (e.g. 32 "
                             "captions like the ones you will sample)")
    elif isinstance(quantization, (str, Path)):
        check_quantized_folder(quantization)
        if calibration_prompts is not None:
            raise ValueError("calibration_prompts are for a QuantizeJob; a saved quantization "
                             f"({quantization}) is loaded as it is")
    else:
        raise TypeError("quantization must be a folder written by `qlip quantize` or a "
                        f"QuantizeJob; got {type(quantization).__name__}")
    original = _Original.of(pipe)
    try:
        if isinstance(quantization, QuantizeJob):
            _, info = run_quantize_job(pipe, list(calibration_prompts), quantization, out_dir,
                                       progress)
            source = f"{quantization.method} in place" + (f", saved to {out_dir}" if out_dir
                                                          else "")
            folder = out_dir
        else:
            info = load_quantized(pipe.unet, quantization)
            source, folder = str(quantization), quantization
        apply_saved_correction(pipe, info.extra)
        chosen = policy or saved_policy(pipe, folder, info, abits)
        session = SamplingSession(pipe, chosen, batch_mode)
    except BaseException:
        original.restore(pipe)  # a failed attach leaves the pipeline as it was
        raise
    handle = AttachedQuantization(session, info, source, original)
    setattr(pipe, ATTACHED, handle)
    return handle


def detach_quantization(pipe):
    """Remove what :func:`attach_quantization` did: the hooks, PTQD's scheduler wrapper and
    every quantized module (the original layers and attention processors come back, so the
    pipeline's outputs are its FP outputs bit for bit). Returns ``pipe``."""
    handle = getattr(pipe, "__dict__", {}).get(ATTACHED)
    if not isinstance(handle, AttachedQuantization):
        raise ValueError("no quantization is attached to this pipeline "
                         "(qlip.attach_quantization attaches one)")
    handle.session.close()
    handle._original.restore(pipe)
    delattr(pipe, ATTACHED)
    return pipe
