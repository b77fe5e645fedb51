"""Preparing a diffusers UNet for quantization: where the decoder concatenates skip inputs, and
the module swap with the right input splits."""

from __future__ import annotations

from torch import nn

from ..nn import QuantConfig, QuantUnit, quantize_model


def decoder_input_splits(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """For each up-block ResNet, the channel sizes of ``cat([h, skip])`` seen by its first conv and
    its 1×1 shortcut conv (Q-Diffusion's shortcut splitting)."""
    splits: dict[str, tuple[int, ...]] = {}
    config = getattr(unet, "config", None)
    # diffusers: the first up block's "previous output" is the deepest block's width (mid block or not)
    prev_out = config.block_out_channels[-1] if config is not None else None
    for b, block in enumerate(getattr(unet, "up_blocks", [])):
        for i, resnet in enumerate(block.resnets):
            h_channels = prev_out if i == 0 else block.resnets[i - 1].out_channels
            total = resnet.in_channels
            if h_channels is None or not 0 < h_channels < total:
                continue
            pair = (h_channels, total - h_channels)
            splits[f"up_blocks.{b}.resnets.{i}.conv1"] = pair
            if getattr(resnet, "conv_shortcut", None) is not None:
                splits[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = pair
        prev_out = block.resnets[-1].out_channels
    return splits


def prepare_unet(unet: nn.Module, config: QuantConfig) -> dict[str, QuantUnit]:
    """Swap the UNet's layers for quantized ones (in place) and freeze it. Returns the units."""
    splits = decoder_input_splits(unet) if config.split_shortcuts else {}
    units = quantize_model(unet, config, splits)
    unet.requires_grad_(False)
    return units
