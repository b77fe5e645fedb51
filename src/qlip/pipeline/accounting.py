"""Exact per-image cost accounting: FAB, MAC-weighted bits and BitOPs (ALGORITHMS.md conventions).

- FAB: mean activation bit-width over the quantized Linear/Conv layers and the sampling steps.
- weighted bits: the same mean, weighted by each layer's MACs.
- BitOPs: Σ over every matmul and conv of the UNet of MACs × b_w × b_a, the attention matmuls
  included (QKᵀ at b_q·b_k, attention·V at b_probs·b_v); FP modules count 32 × 32. Per image: all
  sampling steps and both halves of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn import QuantAttnProcessor, QuantLayer, QuantUnit
from ..quant import BYPASS_BITS, is_bypass


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
    fab: float  # as run (each layer at the batch's maximum)
    fab_requested: float  # what the policy asked for this prompt alone
    weighted_bits: float
    bitops_t: float  # tera bit-operations
    macs_g: float  # giga MACs
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "head_to_batch_dim")


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
            if isinstance(module, QuantLayer) or type(module) in (nn.Linear, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            elif _is_attention(module):
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
            kind = module.kind if isinstance(module, QuantLayer) else (
                "conv2d" if isinstance(module, nn.Conv2d) else "linear")
            unit = name if isinstance(module, QuantLayer) else None
            self.sites.append(MatmulSite(name, kind, _layer_macs(module, out), unit))

        return hook

    def _attention_hook(self, name: str):
        def hook(module, args, kwargs, out):
            macs = _attention_macs(module, args, kwargs)
            unit = f"{name}.processor" if isinstance(module.processor, QuantAttnProcessor) else None
            self.sites.append(MatmulSite(f"{name}.qk", "attn_qk", macs, unit))
            self.sites.append(MatmulSite(f"{name}.pv", "attn_pv", macs, unit))

        return hook


def site_bits(site: MatmulSite, units: dict[str, QuantUnit], abits: dict[str, int]) -> tuple[int, int]:
    """The two operand bit-widths of a site given the units' activation bits."""
    if site.unit is None:
        return BYPASS_BITS, BYPASS_BITS
    unit = units[site.unit]
    a = abits[site.unit]
    a = BYPASS_BITS if is_bypass(a) else a
    if site.kind == "attn_qk":
        return a, a
    if site.kind == "attn_pv":
        return (BYPASS_BITS if is_bypass(unit.prob_bits) else unit.prob_bits), a
    return (BYPASS_BITS if is_bypass(unit.wbits) else unit.wbits), a


class BitLedger:
    """Records the bits every unit ran at, step by step, and turns them into per-image reports."""

    def __init__(self, units: dict[str, QuantUnit]):
        self.units = units
        self.layer_names = [n for n, u in units.items() if isinstance(u, QuantLayer)]
        self.sites: list[MatmulSite] = []
        self.run_steps: list[dict[str, int]] = []  # per step: unit -> bits as run
        self.requested_steps: list[dict[str, torch.Tensor]] = []  # per step: unit -> [B] bits

    def record_step(self, requested: dict[str, torch.Tensor] | None = None) -> None:
        self.run_steps.append({name: int(unit.abits) for name, unit in self.units.items()})
        self.requested_steps.append(requested or {})

    def _fab(self, bits: list[dict[str, int]]) -> tuple[float, float]:
        if not self.layer_names or not bits:
            return float(BYPASS_BITS), float(BYPASS_BITS)
        layers = set(self.layer_names)
        macs = {s.unit: s.macs for s in self.sites if s.unit in layers}
        total = sum(bits_at[n] for bits_at in bits for n in self.layer_names)
        fab = total / (len(bits) * len(self.layer_names))
        weight = sum(macs.get(n, 0) for n in self.layer_names) * len(bits)
        weighted = sum(bits_at[n] * macs.get(n, 0) for bits_at in bits for n in self.layer_names)
        return fab, (weighted / weight if weight else fab)

    def bitops_per_element(self) -> tuple[float, float]:
        """(BitOPs, MACs) summed over the recorded steps, per batch element."""
        bitops = macs = 0.0
        for abits in self.run_steps:
            for site in self.sites:
                b1, b2 = site_bits(site, self.units, abits)
                bitops += site.macs * b1 * b2
                macs += site.macs
        return bitops, macs

    def reports(
        self, prompts: list[str], seeds: list[int | None], elements_per_image: int
    ) -> list[ImageReport]:
        fab, weighted = self._fab(self._as_run_clamped(self.run_steps))
        bitops, macs = self.bitops_per_element()
        out = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            requested = [
                {n: int(req[n][i]) if n in req else run[n] for n in run}
                for run, req in zip(self.run_steps, self.requested_steps)
            ]
            fab_req, _ = self._fab(self._as_run_clamped(requested))
            out.append(ImageReport(
                prompt=prompt, seed=seed, fab=fab, fab_requested=fab_req, weighted_bits=weighted,
                bitops_t=bitops * elements_per_image / 1e12, macs_g=macs * elements_per_image / 1e9,
                steps=len(self.run_steps),
            ))
        return out

    @staticmethod
    def _as_run_clamped(steps: list[dict[str, int]]) -> list[dict[str, int]]:
        # any bypass width counts as 32
        return [{n: (BYPASS_BITS if is_bypass(b) else b) for n, b in s.items()} for s in steps]
