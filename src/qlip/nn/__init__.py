"""Quantized modules, by module swap. A module knows nothing about prompts or timesteps: it is told
its bit-width (and, for per-step tables, its step index)."""

from .attention import QuantAttnProcessor
from .bank import ActivationBank, log2_factory, uniform_factory
from .config import PRESETS, LayerRule, QuantConfig
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .swap import QuantUnit, quant_units, quantize_model

__all__ = [
    "PRESETS",
    "ActivationBank",
    "LayerRule",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantUnit",
    "log2_factory",
    "quant_units",
    "quantize_model",
    "uniform_factory",
]
