"""Exact per-image cost accounting: FAB, MAC-weighted bits and BitOPs (ALGORITHMS.md conventions).

- FAB: mean activation bit-width over the quantized Linear/Conv layers and the sampling steps.
- weighted bits: the same mean, weighted by each layer's MACs.
- BitOPs: Σ over every matmul and conv of the UNet of MACs × b_w × b_a, the attention matmuls
  included (QKᵀ at b_q·b_k, attention·V at b_probs·b_v); FP modules count 32 × 32. Per image: all
  sampling steps and both halves of classifier-free guidance.

Every figure is counted from the bits each image actually ran at (in ``max`` batch mode: the
batch's maximum; in ``per_image`` mode: its own), and FAB also from what the policy requested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..nn import QuantUnit, fp_bits, is_attention_module
from ..quant import BYPASS_BITS


@dataclass(frozen=True)
class MatmulSite:
    """One matmul/conv of the model: its MACs per batch element and the unit that sets its bits."""

    name: str
    kind: str  # "linear", "conv2d", "attn_qk", "attn_pv"
    macs: int  # per batch element (one UNet input)
    unit: str | None  # quantized unit name, None when the site runs in full precision


@dataclass
class ImageReport:
    """Cost of one generated image."""

    prompt: str
    seed: int | None
    fab: float  # as run
    fab_requested: float  # what the policy asked for this prompt alone
    weighted_bits: float
    bitops_t: float  # tera bit-operations, as run
    macs_g: float  # giga MACs
    steps: int  # sampling steps (the scheduler's num_inference_steps)
    batch_mode: str = "max"
    unet_calls: int | None = None  # UNet calls of the run (PNDM: steps + 1); the costs count them

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    # MACs per batch element: each output value costs (input fan-in) multiply-adds
    weight = module.weight
    fan_in = weight.shape[1] * (weight[0, 0].numel() if weight.ndim == 4 else 1)
    return int(out.numel() // out.shape[0] * fan_in)


def _attention_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    n = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
    m = n if context is None else context.shape[1]
    inner = module.to_q.weight.shape[0]
    return int(n * m * inner)  # QKᵀ over all heads; attention·V costs the same


class MacCounter:
    """Counts, on one forward pass, the MACs per batch element of every matmul site of a model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: list[MatmulSite] = []
        self._handles: list = []

    def __enter__(self) -> MacCounter:
        for name, module in self.model.named_modules():
            is_unit = isinstance(module, QuantUnit) and module.fab_member
            if is_unit or type(module) in (nn.Linear, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            elif is_attention_module(module):
                self._handles.append(
                    module.register_forward_hook(self._attention_hook(name), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, name: str):
        def hook(module, args, out):
            unit = name if isinstance(module, QuantUnit) else None
            kind = "conv2d" if module.weight.ndim == 4 else "linear"
            self.sites.append(MatmulSite(name, kind, _layer_macs(module, out), unit))

        return hook

    def _attention_hook(self, name: str):
        def hook(module, args, kwargs, out):
            macs = _attention_macs(module, args, kwargs)
            unit = f"{name}.processor" if isinstance(module.processor, QuantUnit) else None
            self.sites.append(MatmulSite(f"{name}.qk", "attn_qk", macs, unit))
            self.sites.append(MatmulSite(f"{name}.pv", "attn_pv", macs, unit))

        return hook


class BitLedger:
    """Records, step by step, the bits every dynamic unit ran at and what the policy requested (as
    device tensors: no sync in the loop), and turns them into per-image reports at the end."""

    def __init__(self, units: dict[str, QuantUnit], dynamic: list[str], batch_mode: str = "max"):
        self.units = units
        self.dynamic = list(dynamic)
        self.batch_mode = batch_mode
        self.sites: list[MatmulSite] = []
        self.steps = 0
        self._run: list[torch.Tensor] = []  # per step: [U] (max) or [U, n] bits as run
        self._requested: list[torch.Tensor] = []  # per step: [n, U] bits requested

    def record_step(self, run: torch.Tensor | None = None, requested: torch.Tensor | None = None):
        self.steps += 1
        if run is not None:
            self._run.append(run)
            self._requested.append(requested)

    def unit_bits(self, num_images: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(as run, requested): per unit, ``[steps, images]`` bit-widths (32 for bypass)."""
        shape = (self.steps, num_images)
        run = {n: np.full(shape, fp_bits(u.default_bits)) for n, u in self.units.items()}
        requested = {n: a.copy() for n, a in run.items()}
        if self._run:
            ran = torch.stack(self._run).cpu().numpy()  # one read of the device, at the end
            if ran.ndim == 2:  # max mode: [S, U] -> every image at the batch's bits
                ran = np.repeat(ran[:, :, None], num_images, axis=2)
            asked = torch.stack(self._requested).cpu().numpy().transpose(0, 2, 1)  # [S, U, n]
            for j, name in enumerate(self.dynamic):
                run[name], requested[name] = fp_bits(ran[:, j]), fp_bits(asked[:, j])
        return run, requested

    def _fab(self, bits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        layers = [n for n, u in self.units.items() if u.fab_member]
        if not layers or not self.steps:
            return np.full(1, float(BYPASS_BITS)), np.full(1, float(BYPASS_BITS))
        macs = {s.unit: s.macs for s in self.sites if s.unit in bits}
        stacked = np.stack([bits[n] for n in layers]).astype(np.float64)  # [L, S, n]
        fab = stacked.mean(axis=(0, 1))
        weights = np.array([macs.get(n, 0) for n in layers], dtype=np.float64)
        if not weights.sum():
            return fab, fab
        weighted = (stacked.sum(axis=1) * weights[:, None]).sum(axis=0) / (weights.sum() * self.steps)
        return fab, weighted

    def bitops_per_element(self, bits: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """(BitOPs [images], MACs) summed over the recorded steps, per batch element."""
        n = next(iter(bits.values())).shape[1] if bits else 1
        bitops = np.zeros(n)
        macs = 0.0
        for site in self.sites:
            macs += site.macs * self.steps
            if site.unit is None:
                bitops += site.macs * self.steps * BYPASS_BITS * BYPASS_BITS
                continue
            b1, b2 = self.units[site.unit].operand_bits(site.kind, bits[site.unit])
            bitops += site.macs * (np.asarray(b1, np.float64) * b2).sum(axis=0)
        return bitops, macs

    def reports(
        self, prompts: list[str], seeds: list[int | None], elements_per_image: int,
        sampling_steps: int | None = None,
    ) -> list[ImageReport]:
        """One report per image; ``sampling_steps`` (default: the recorded UNet calls) is what
        ``steps`` says, the costs are summed over every recorded call."""
        run, requested = self.unit_bits(len(prompts))
        fab, weighted = self._fab(run)
        fab_req, _ = self._fab(requested)
        bitops, macs = self.bitops_per_element(run)
        out = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            out.append(ImageReport(
                prompt=prompt, seed=seed, fab=float(_pick(fab, i)),
                fab_requested=float(_pick(fab_req, i)), weighted_bits=float(_pick(weighted, i)),
                bitops_t=float(_pick(bitops, i)) * elements_per_image / 1e12,
                macs_g=macs * elements_per_image / 1e9,
                steps=self.steps if sampling_steps is None else sampling_steps,
                batch_mode=self.batch_mode, unet_calls=self.steps,
            ))
        return out


def _pick(values: np.ndarray, i: int) -> float:
    return values[i] if values.shape[0] > 1 else values[0]
