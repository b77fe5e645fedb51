"""Module swap: replace Linear/Conv2d by quantized layers and attention processors by quantized ones."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.stacked import StackedQuantizer
from .attention import QuantAttnProcessor
from .config import QuantConfig
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .unit import QuantUnit


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def is_attention_module(module: nn.Module) -> bool:
    # diffusers' Attention; checked by duck typing so this layer needs no diffusers import
    return hasattr(module, "set_processor") and hasattr(module, "head_to_batch_dim")


def make_layer(
    base: nn.Linear | nn.Conv2d, config: QuantConfig, wbits: int, abits: int | None,
    splits: tuple[int, ...] | None = None,
) -> QuantLayer:
    cls = QuantLinear if isinstance(base, nn.Linear) else QuantConv2d
    return cls(
        base,
        wbits=wbits,
        abits_options=(abits,) if abits is not None else config.abits_options,
        abits=abits if abits is not None else config.abits,
        splits=splits,
        weight_symmetric=config.weight_symmetric,
        weight_per_channel=config.weight_per_channel,
        act_symmetric=config.act_symmetric,
        act_steps=config.act_steps,
        dynamic=abits is None,
        act_groups=config.act_groups,
    )


def make_processor(config: QuantConfig, abits: int | None) -> QuantAttnProcessor:
    return QuantAttnProcessor(
        abits_options=(abits,) if abits is not None else config.abits_options,
        abits=abits if abits is not None else config.abits,
        prob_bits=config.softmax_bits,
        prob_quantizer=config.softmax_quantizer,
        keep_start_token=config.keep_start_token,
        act_symmetric=config.act_symmetric,
        act_steps=config.act_steps,
        dynamic=abits is None,
        act_groups=config.act_groups,
        prob_follows_abits=config.softmax_follows_abits,
    )


def quantize_model(
    model: nn.Module, config: QuantConfig, splits: dict[str, tuple[int, ...]] | None = None
) -> dict[str, QuantUnit]:
    """Swap, in place, every Linear/Conv2d that the config's rules select for a quantized layer, and
    give every selected attention module a :class:`QuantAttnProcessor`. ``splits`` maps a layer name
    to the channel sizes of its concatenated input (shortcut splitting). Returns the units by name.

    >>> units = quantize_model(nn.Sequential(nn.Linear(4, 4)), QuantConfig(wbits=8, abits=8))
    >>> sorted(units)
    ['0']
    """
    splits = splits or {}
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, QuantUnit):
            raise ValueError("this model is already quantized; start again from the FP model")
        is_layer = type(module) in (nn.Linear, nn.Conv2d)
        is_attn = config.quantize_attention and is_attention_module(module)
        if not (is_layer or is_attn):
            continue
        rule = config.rule_for(name)
        if rule is not None and not rule.quantize:
            continue
        wbits = rule.wbits if rule and rule.wbits is not None else config.wbits
        abits = rule.abits if rule else None
        targets.append((name, module, wbits, abits, is_layer))

    units: dict[str, QuantUnit] = {}
    for name, module, wbits, abits, is_layer in targets:
        if is_layer:
            layer = make_layer(module, config, wbits, abits, splits.get(name))
            layer.to(module.weight.device)  # quantizer state lives beside the weights
            _set_submodule(model, name, layer)
            units[name] = layer
        else:
            processor = make_processor(config, abits).to(module.to_q.weight.device)
            module.set_processor(processor)
            units[f"{name}.processor"] = processor
    return {name: units[name] for name in quant_units(model)}  # in module order, as quant_units


def quant_units(model: nn.Module) -> dict[str, QuantUnit]:
    """Every quantized unit (layer or attention processor) of ``model``, by qualified name."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, QuantUnit)
    }


def pack_weights(model: nn.Module) -> int:
    """Pack the weights of every quantized layer of ``model`` that has at most 4-bit weight codes
    (``QuantUnit.pack_weights``: codes two per byte, the FP weight freed); returns how many."""
    return sum(unit.pack_weights() for unit in quant_units(model).values())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the storage that ``model``'s parameters and buffers hold, and its layers' real
    execution operands (``use_real``: int8 or e4m3 codes, dequantized weights), each storage
    once (a packed layer's one-element weight placeholder counts its one element; operands that
    are its own packed bytes count once)."""
    held = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if isinstance(module, QuantLayer):
            for part in (*(module._real_parts or ()), module._real_float or ()):
                held += [t for t in part if isinstance(t, torch.Tensor)]
    seen, total = set(), 0
    for t in held:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def use_fused_attention(model: nn.Module, on: bool | None = True) -> int:
    """Turn the fused quantized attention (``QuantAttnProcessor.fused``) on, off, or (``None``,
    the default a unit starts with) on where its Triton kernel runs, for every unit of
    ``model`` that has one; returns how many."""
    return sum(unit.use_fused(on) for unit in quant_units(model).values())


def use_fused_quantize(model: nn.Module, on: bool = True) -> int:
    """Turn the one-launch activation quantizer (``StackedQuantizer.kernel``,
    :mod:`qlip.quant.fused_quantize`: eager inference on the GPU, the same values) on or off for
    every stacked quantizer in ``model``; returns how many. It is on by default."""
    count = 0
    for module in model.modules():
        if isinstance(module, StackedQuantizer):
            module.kernel = on
            count += 1
    return count


def use_real_execution(model: nn.Module, on: bool = True, float_weights: bool = True,
                       fp8: bool | None = None) -> int:
    """Run every quantized layer of ``model`` that can for real (``QuantLayer.use_real``: the
    Linear layers and the convolutions, strided ones included, integer math at options of at
    most 8 bits, chosen on the device, in eager or compiled GPU inference); returns how many
    were switched. ``float_weights``: layers with float options beside integer ones (A16
    beside A8) keep their dequantized weights for them, faster for more memory. ``fp8``: the
    one-GEMM layers whose every option is A8 (W ≤ 4) run in e4m3 through ``torch._scaled_mm``
    instead (:mod:`qlip.quant.real_fp8`: not the integer simulation's values; measure it);
    None keeps each layer's last choice (at first, no fp8)."""
    return sum(module.use_real(on, float_weights, fp8) for module in model.modules()
               if isinstance(module, QuantLayer))


def use_fp8_execution(model: nn.Module, on: bool = True) -> int:
    """Run only the layers of ``model`` that can take fp8 for real (``use_real(fp8=True)``: the
    one-GEMM layers whose every option is A8, weights of at most 4 bits), through
    ``torch._scaled_mm`` on the CPU or an fp8 GPU; every other layer stays simulated (no
    Triton needed). Returns how many run in fp8; ``on=False`` puts them back."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLayer):
            if on and module.use_real(True, fp8=True) and module._real_fp8:
                count += 1
            elif module._real_parts is not None or not on:
                module.use_real(False, fp8=False)
    return count
