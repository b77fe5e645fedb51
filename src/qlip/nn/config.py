"""What to quantize and how: the quantization config, layer rules and the common presets."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields

from ..quant import check_bits
from .attention import PROB_QUANTIZERS


@dataclass(frozen=True)
class LayerRule:
    """Decides the treatment of every module whose qualified name matches ``pattern`` (fnmatch glob,
    e.g. ``"conv_in"``, ``"*.attn2"``, ``"time_embedding.*"``).

    ``quantize=False`` keeps the module in full precision. ``wbits=None`` takes the config's weight
    bits; ``abits=None`` leaves the activation bits to the bit policy, an int fixes them.
    """

    pattern: str
    quantize: bool = True
    wbits: int | None = None
    abits: int | None = None

    def __post_init__(self):
        if self.wbits is not None:
            check_bits(self.wbits, f"wbits of rule {self.pattern!r}")
        if self.abits is not None:
            check_bits(self.abits, f"abits of rule {self.pattern!r}")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


# The layer policies of the methods (ALGORITHMS.md). Precedence: the config's own ``rules`` first,
# then the preset's, in order; the first matching rule decides; unmatched modules are quantized
# with the config's bits.
PRESETS: dict[str, tuple[LayerRule, ...]] = {
    # Q-Diffusion: every Conv2d/Linear, first and last conv and time embedding included.
    "qdiffusion": (),
    # PTQD: the input conv, the output conv and the time-embedding input linear keep 8-bit weights
    # (their activations follow the bit setting, so FAB stays that of the setting, as PTQD reports).
    "ptqd": (
        LayerRule("conv_in", wbits=8),
        LayerRule("conv_out", wbits=8),
        LayerRule("time_embedding.linear_1", wbits=8),
    ),
    # DGQ: conv_in and conv_out stay in full precision, weights and activations.
    "dgq": (LayerRule("conv_in", quantize=False), LayerRule("conv_out", quantize=False)),
}


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized. ``abits`` is the active activation bit-width at start;
    ``abits_options`` the bank calibrated for run-time switching (default: just ``abits``)."""

    wbits: int = 4
    abits: int = 8
    abits_options: tuple[int, ...] = ()
    preset: str = "qdiffusion"
    rules: tuple[LayerRule, ...] = ()
    weight_symmetric: bool = False
    weight_per_channel: bool = True
    act_symmetric: bool = False
    act_steps: int | None = None  # per-step activation tables with this many rows
    # DGQ: activations in this many groups along channel or token, chosen per step (1: per tensor)
    act_groups: int = 1
    quantize_attention: bool = True
    softmax_bits: int = 16
    # the softmax output at each unit's activation bits (its bank's options) instead of softmax_bits
    softmax_follows_abits: bool = False
    softmax_quantizer: str = "uniform"
    keep_start_token: bool = False
    split_shortcuts: bool = True
    extra: dict = field(default_factory=dict)  # method-specific notes, saved verbatim

    def __post_init__(self):
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        check_bits(self.softmax_bits, "softmax bits")
        options = tuple(sorted({check_bits(b, "abits option") for b in self.abits_options}))
        if options and self.abits not in options:
            raise ValueError(f"abits {self.abits} must be one of abits_options {options}")
        object.__setattr__(self, "abits_options", options or (self.abits,))
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {self.preset!r}")
        if self.softmax_quantizer not in PROB_QUANTIZERS:
            raise ValueError(f"softmax_quantizer must be one of {PROB_QUANTIZERS}")
        if isinstance(self.act_groups, bool) or not isinstance(self.act_groups, int) or (
                self.act_groups < 1):
            raise ValueError(f"act_groups must be an integer >= 1 (1 = per tensor); got "
                             f"{self.act_groups!r}")
        if self.act_groups > 1 and self.act_symmetric:
            raise ValueError("grouped activations (act_groups > 1) are asymmetric; drop "
                             "act_symmetric")
        if self.act_steps is not None and self.act_steps < 1:
            raise ValueError(f"act_steps must be >= 1 or None; got {self.act_steps}")
        object.__setattr__(self, "rules", tuple(
            r if isinstance(r, LayerRule) else LayerRule(**r) for r in self.rules))

    def rule_for(self, name: str) -> LayerRule | None:
        for rule in (*self.rules, *PRESETS[self.preset]):
            if rule.matches(name):
                return rule
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rules"] = [asdict(r) for r in self.rules]
        out["abits_options"] = list(self.abits_options)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization config fields {sorted(unknown)}")
        data = dict(data)
        data["abits_options"] = tuple(data.get("abits_options", ()))
        data["rules"] = tuple(LayerRule(**r) for r in data.get("rules", ()))
        return cls(**data)
