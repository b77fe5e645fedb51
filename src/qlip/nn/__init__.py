"""Quantized modules, by module swap. A module knows nothing about prompts or timesteps: it is told
its bit-width (and, for per-step tables, its step index)."""

from .attention import QuantAttnProcessor
from .bank import BANK_KINDS, ActivationBank
from .config import PRESETS, LayerRule, QuantConfig
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .swap import (
    is_attention_module,
    pack_weights,
    quant_units,
    quantize_model,
    tensor_bytes,
    use_fp8_execution,
    use_fused_attention,
    use_fused_quantize,
    use_real_execution,
)
from .unit import QuantUnit, activations_bypassed, fp_bits, verify_calibrated

__all__ = [
    "BANK_KINDS",
    "PRESETS",
    "ActivationBank",
    "LayerRule",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantUnit",
    "activations_bypassed",
    "fp_bits",
    "is_attention_module",
    "pack_weights",
    "quant_units",
    "quantize_model",
    "tensor_bytes",
    "use_fused_attention",
    "use_fused_quantize",
    "use_fp8_execution",
    "use_real_execution",
    "verify_calibrated",
]
