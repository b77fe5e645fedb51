"""A pipeline made ready to sample a quantized model: the saved state loaded onto its UNet, PTQD's
scheduler wrapper applied when the model carries its statistics, and the bit policy chosen. The
command lines (`qlip generate`, `qlip eval`) only map their flags onto this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..methods.bit_assignment import load_assignment
from ..methods.qlip import has_qlip, load_qlip
from ..nn import pack_weights, use_fp8_execution, use_fused_attention, use_real_execution
from ..policies import BitPolicy, FixedBits, PerLayerBits, QLIPPolicy, RandomMatchedBits
from ..quant import fused_quantize
from ..quant.real_fp8 import supported as real_fp8_supported
from .cache import file_digest
from .generate import load_generation_bits
from .ptqd_sampling import apply_saved_correction
from .saving import STATE_FILE, QuantizedInfo, check_quantized_folder, load_quantized

POLICIES = ("auto", "random-matched", "per-layer")


@dataclass
class PolicyConfig:
    """Which bit policy samples a quantized model (`--policy` and the flags it needs).

    - ``auto``: ``--abits`` for every unit; else QLIP when the folder holds ``qlip.json``; else
      the model's own abits.
    - ``random-matched``: :class:`~qlip.policies.RandomMatchedBits` drawn from the ``requested``
      bits of the run in ``bits_from`` (an eval or generate folder with ``bits.safetensors``),
      keyed by prompt text and ``seed``.
    - ``per-layer``: :class:`~qlip.policies.PerLayerBits` from the ``assignment`` file of
      `qlip per-layer`.
    """

    policy: str = "auto"
    bits_from: str | None = None
    seed: int = 0
    assignment: str | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {POLICIES}; got {self.policy!r}")
        if self.policy == "random-matched" and not self.bits_from:
            raise ValueError("--policy random-matched needs --bits-from FOLDER (an eval or "
                             "generate run with bits.safetensors, e.g. QLIP's eval)")
        if self.policy == "per-layer" and not self.assignment:
            raise ValueError("--policy per-layer needs --assignment FILE (from `qlip per-layer`)")
        if self.bits_from and self.policy != "random-matched":
            raise ValueError("--bits-from is for --policy random-matched")
        if self.assignment and self.policy != "per-layer":
            raise ValueError("--assignment is for --policy per-layer")


def check_policy_inputs(config: PolicyConfig, quantized: str | Path | None,
                        abits: int | None = None) -> None:
    """Every check of the policy's inputs that needs no model loaded (before any work): the
    files exist and are what they say, and their units are the quantized model's."""
    if config.policy == "auto":
        return
    if not quantized:
        raise ValueError(f"--policy {config.policy} needs --quantized DIR")
    if abits:
        raise ValueError(f"--abits and --policy {config.policy} both choose the bits: give one")
    units = set(check_quantized_folder(quantized)["units"])
    if config.policy == "random-matched":
        _, _, names = load_generation_bits(config.bits_from)
        if set(names) != units:
            odd = sorted(set(names) ^ units)[0]
            raise ValueError(f"--bits-from {config.bits_from} holds the bits of other units than "
                             f"{quantized}'s (e.g. {odd}): take a run of this quantized model")
        return
    document = load_assignment(config.assignment)
    unknown = sorted(set(document["bits"]) - units)
    if unknown:
        raise ValueError(f"--assignment {config.assignment} names units {quantized} does not have "
                         f"(e.g. {unknown[0]}): compute it for this model (`qlip per-layer`)")
    made_on = document.get("quantized", {}).get("state_digest")
    if made_on and made_on != file_digest(Path(quantized) / STATE_FILE):
        raise ValueError(f"--assignment {config.assignment} was measured on another quantized "
                         f"model than {quantized} (its {STATE_FILE} differs): compute it for "
                         "this model")


# how quantized attention computes softmax·V (QuantAttnProcessor.fused): the fused kernel where
# it runs, always (the PyTorch passes off the GPU), or the probabilities materialised
ATTENTION_MODES = {"auto": None, "fused": True, "materialised": False}


def attention_mode(attention: str) -> bool | None:
    """``attention``'s ``QuantAttnProcessor.fused`` value (:data:`ATTENTION_MODES`), or a
    ValueError naming the modes."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {tuple(ATTENTION_MODES)}; got {attention!r}")
    return ATTENTION_MODES[attention]


def fused_attention_on(attention: str, device: str) -> bool:
    """Whether ``attention`` (a key of :data:`ATTENTION_MODES`) fuses quantized attention on
    ``device``: ``auto`` where the Triton kernel runs (a CUDA device, Triton installed)."""
    on = attention_mode(attention)
    if on is None:
        return fused_quantize.triton is not None and str(device).startswith("cuda")
    return on


def load_for_sampling(
    pipe, quantized: str | Path | None = None, abits: int | None = None,
    policy: PolicyConfig | None = None, packed_weights: bool = False, real_kernels: bool = False,
    real_fp8: bool = False, attention: str = "auto",
) -> BitPolicy | None:
    """Load the quantized model folder ``quantized`` onto ``pipe.unet`` (in place), wrap the
    scheduler with PTQD's correction when the folder holds PTQD statistics, and return the bit
    policy to sample with (``policy``, :class:`PolicyConfig`; by default ``abits`` for every unit,
    else QLIP when the folder holds a trained T2Q/Q2B (``qlip train-qlip``), else the model's own
    ``abits``). Without ``quantized`` the pipeline stays full precision and the policy is None.
    ``packed_weights`` keeps every layer's weights of at most 4 bits as codes two per byte and
    frees its FP weight (``qlip.nn.pack_weights``): the same images in less memory, each layer
    dequantizing its weight at every call. ``real_kernels`` runs the layers in low-precision
    math (:func:`prepare_real_kernels`; a CUDA GPU with Triton); ``real_fp8`` runs the A8-only
    GEMM layers in fp8 (``qlip.quant.real_fp8``), with ``real_kernels`` or alone (the other
    layers simulated; the CPU too). ``attention`` (:data:`ATTENTION_MODES`): quantized
    attention's softmax·V through the fused kernel where it runs (``auto``), always
    (``fused``) or never (``materialised``).

    >>> policy = load_for_sampling(pipe, "runs/w4a8", abits=16)  # doctest: +SKIP
    >>> result = generate(pipe, ["a red circle"], seeds=[0], policy=policy)  # doctest: +SKIP
    """
    check_sampling_flags(quantized, abits, packed_weights, real_kernels,
                         pipe.unet.device.type if real_kernels or real_fp8 else None, real_fp8)
    policy = policy or PolicyConfig()
    check_policy_inputs(policy, quantized, abits)
    fused = attention_mode(attention)  # (a bad mode refused before loading)
    if not quantized:
        return None
    info = load_quantized(pipe.unet, quantized)
    use_fused_attention(pipe.unet, fused)
    if real_kernels:
        prepare_real_kernels(pipe.unet, packed_weights, fp8=real_fp8)
    else:
        if packed_weights:
            pack_weights(pipe.unet)
        if real_fp8:
            use_fp8_execution(pipe.unet)
    apply_saved_correction(pipe, info.extra)
    if policy.policy == "random-matched":
        _, requested, names = load_generation_bits(policy.bits_from)
        return RandomMatchedBits(requested, names, policy.seed)
    if policy.policy == "per-layer":
        document = load_assignment(policy.assignment)
        return PerLayerBits(document["bits"], f"per-layer {file_digest(policy.assignment)}")
    return saved_policy(pipe, quantized, info, abits)


def check_sampling_flags(quantized, abits: int | None = None, packed_weights: bool = False,
                         real_kernels: bool = False, device: str | None = None,
                         real_fp8: bool = False, batch_mode: str | None = None) -> None:
    """Refuse, before any work, sampling options that need a quantized model without one, and
    real kernels (``device``: the pipeline's, ``cpu`` or ``cuda``) where they cannot run."""
    if not quantized and (abits or packed_weights or real_kernels or real_fp8):
        flag = ("--abits" if abits else "--packed-weights" if packed_weights
                else "--real-kernels" if real_kernels else "--fp8")
        raise ValueError(f"{flag} needs --quantized DIR, a quantized model folder (made by "
                         "`qlip quantize`)")
    if real_kernels and (fused_quantize.triton is None or not str(device).startswith("cuda")):
        raise ValueError("--real-kernels runs Triton kernels on a CUDA GPU (this run: device "
                         f"{device}, Triton {'missing' if fused_quantize.triton is None else 'installed'}); "
                         "run without it: the simulation computes the same quantized model")
    if (real_kernels or real_fp8) and batch_mode == "per_image":
        flag = "--real-kernels" if real_kernels else "--fp8"
        raise ValueError(f"{flag} runs one bit choice a batch; --batch-mode per_image gives each "
                         "image its own, which real layers cannot take (they would run the "
                         "simulation instead): use --batch-mode max (at fixed bits every image "
                         "gets the same bits either way)")
    if real_fp8 and str(device).startswith("cuda") and not real_fp8_supported(device):
        raise ValueError(f"--fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or "
                         f"newer: Ada, Hopper); {torch.cuda.get_device_name(device)} has none: "
                         "run --real-kernels without --fp8 (int8)")


def prepare_real_kernels(unet, packed_weights: bool = False, fp8: bool = False) -> int:
    """Make a loaded quantized ``unet`` run its layers in low-precision math
    (``qlip.nn.use_real_execution``: integer math at A8 and below, float math above, the option
    read on the device): channels-last first, the layout its convolutions read and write, then, with
    ``packed_weights``, the codes two per byte (the kernels read those bytes). Returns how many
    layers run for real. ``fp8``: the one-GEMM layers whose every option is A8 run in e4m3
    (``use_real_execution(fp8=True)``). A per-image choice (``--batch-mode per_image`` with images at other
    bits) runs those layers in the simulation."""
    unet.to(memory_format=torch.channels_last)  # (before packing: a packed weight is a placeholder)
    if packed_weights:
        pack_weights(unet)
    return use_real_execution(unet, fp8=fp8)


def saved_policy(pipe, quantized: str | Path | None, info: QuantizedInfo, abits: int | None = None
                 ) -> BitPolicy:
    """``abits`` for every unit; else QLIP when the folder ``quantized`` holds a trained T2Q/Q2B;
    else the model's own ``abits``."""
    if not abits and quantized and has_qlip(quantized):
        return QLIPPolicy(load_qlip(quantized, pipe.unet.device))
    return FixedBits(abits or info.config.abits)
