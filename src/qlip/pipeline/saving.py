"""Saving and loading a quantized UNet: safetensors plus a versioned JSON config; nothing is
unpickled. The base model's weights are not copied: the saved folder holds the quantizers' state and
the integer weight codes, and is applied on top of the same base model."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import (
    CorruptFileError,
    check_format,
    load_tensors,
    read_json_dict,
    read_tensor_metadata,
    save_tensors,
    write_atomic,
)
from ..nn import QuantConfig, QuantUnit, quant_units
from ..quant.packing import NIBBLE_BITS, pack_nibbles, unpack_nibbles
from ..version import __version__
from .prepare import prepare_unet

FORMAT = "qlip-quantized"
# 2: activation banks stored as stacked tensors (one per bank, all bit-widths);
# 3: weight codes of at most 4 bits stored two per byte (``<unit>.weight_codes_<i>.nibbles``)
VERSION = 3
PACKED = ".nibbles"  # suffix of a packed weight-code tensor
CONFIG_FILE = "quant_config.json"
STATE_FILE = "quant_state.safetensors"


@dataclass
class QuantizedInfo:
    """What a saved quantized model says about itself."""

    config: QuantConfig
    method: str
    method_config: dict = field(default_factory=dict)
    base_model: str = ""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # method state, e.g. PTQD statistics


def fingerprint(unet: nn.Module) -> str:
    """A short hash of the base UNet's architecture and a few of its weights."""
    h = hashlib.sha256()
    # the base model's own parameters only (a quantized UNet also holds quantizer scales)
    params = [(n, p) for n, p in unet.named_parameters() if "quantizers." not in n]
    h.update(str([(n, tuple(p.shape)) for n, p in params]).encode())
    for _, p in params[:2] + params[-2:]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _unit_state(units: dict[str, QuantUnit]) -> dict[str, torch.Tensor]:
    state = {}
    for name, unit in units.items():
        codes = None  # a packed layer's codes, unpacked once
        for key, value in unit.state_dict().items():
            if key in ("weight", "bias"):
                continue  # the base model's own weights
            value = value.detach().contiguous().cpu()
            if key.startswith("weight_nibbles_"):  # a layer packed in memory, in the file's
                # layout (a conv's nibbles are tap-major in memory: packed again in its order)
                index = int(key[len("weight_nibbles_"):])
                codes = unit.weight_codes() if codes is None else codes
                state[f"{name}.weight_codes_{index}{PACKED}"] = pack_nibbles(
                    codes[index].contiguous().cpu())
                continue
            # codes that fit 4 bits (W4 and below) go two a byte; lossless whatever the layer
            if (key.startswith("weight_codes_") and value.dtype == torch.uint8
                    and (value.numel() == 0 or int(value.max()) < 1 << NIBBLE_BITS)):
                state[f"{name}.{key}{PACKED}"] = pack_nibbles(value)
            else:
                state[f"{name}.{key}"] = value
    return state


def _unpack_codes(unet: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed weight codes back to one code per byte, in the shape of the layer's weight slice
    (format 3). A packing that does not fit the layer says which."""
    out = {}
    for key, value in state.items():
        if not key.endswith(PACKED):
            out[key] = value
            continue
        name = key[: -len(PACKED)]
        owner, _, attr = name.rpartition(".")
        shape = unet.get_submodule(owner).weight_slices()[int(attr.rsplit("_", 1)[1])].shape
        try:
            out[name] = unpack_nibbles(value, shape)
        except ValueError as err:
            raise CorruptFileError(f"saved tensor {key!r}: {err}; {REMEDY}") from err
    return out


def save_quantized(unet: nn.Module, info: QuantizedInfo, out_dir: str | Path) -> Path:
    """Write ``quant_config.json`` and ``quant_state.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = quant_units(unet)
    state = _unit_state(units)
    state.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in info.extra.items()})
    save_tensors(state, out / STATE_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "qlip_version": __version__,
        "base_model": info.base_model,
        "base_fingerprint": fingerprint(unet),
        "method": info.method,
        "method_config": info.method_config,
        "quant_config": info.config.to_dict(),
        "units": sorted(units),
    }
    write_atomic(out / CONFIG_FILE, json.dumps(meta, indent=2))  # last: the folder is complete
    return out


def _assign(root: nn.Module, key: str, value: torch.Tensor, device: torch.device) -> None:
    """Put a saved tensor in place; a quantizer slot still empty (None) gets the model's device."""
    owner_name, _, attr = key.rpartition(".")
    owner = root.get_submodule(owner_name)
    current = getattr(owner, attr, None)
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value.to(current.device), requires_grad=False))
    elif attr in owner._buffers or current is None:
        target = current.device if isinstance(current, torch.Tensor) else device
        owner.register_buffer(attr, value.to(target))
    else:
        raise ValueError(f"saved tensor {key!r} does not match a quantizer in this model")


# The QuantConfig fields that decide the weight grid; a model's weights can be reused by a job
# that agrees on all of them (the activation settings may differ).
WEIGHT_FIELDS = ("wbits", "preset", "rules", "weight_symmetric", "weight_per_channel",
                 "split_shortcuts")


def load_quantized_weights(
    unet: nn.Module, units: dict[str, QuantUnit], config: QuantConfig, path: str | Path
) -> None:
    """Copy the integer weight codes and weight grids of the quantized model in ``path`` into
    ``units`` (just made by ``prepare_unet(unet, config)``), leaving the activations alone: a
    new activation calibration then reuses an earlier, costly weight reconstruction."""
    path = Path(path)
    meta = read_config(path)
    if meta["base_fingerprint"] != fingerprint(unet):
        raise ValueError(f"{path} was quantized from a different base model "
                         f"({meta['base_model']!r}); its weights cannot be reused here")
    saved = QuantConfig.from_dict(meta["quant_config"]).to_dict()
    wanted = config.to_dict()
    differing = [k for k in WEIGHT_FIELDS if saved[k] != wanted[k]]
    if differing or sorted(units) != meta["units"]:
        raise ValueError(f"the weights of {path} were quantized with other settings "
                         f"({', '.join(differing) or 'layers'}); quantize the weights again "
                         "instead of reusing them")
    state = _unpack_codes(unet, read_state(path))
    _put_state(unet, units, {k: v for k, v in state.items()
                             if ".weight_codes_" in k or ".weight_quantizers." in k})


def _put_state(
    unet: nn.Module, units: dict[str, QuantUnit], state: dict[str, torch.Tensor]
) -> None:
    """Assign saved quantizer tensors (on the model's device), then rebuild cached weights."""
    device = next(unet.parameters()).device
    for key, value in state.items():
        _assign(unet, key, value, device)
    for unit in units.values():
        unit.refresh()


def _upgrade_v1(unet: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 kept one quantizer per bit-width (``<bank>.quantizers.<bits>.scale``); format 2
    stacks them (``<bank>.stack.scale`` ``[K, T, P]``). Convert, so older folders still load."""
    old = re.compile(r"^(?P<bank>.+)\.quantizers\.(?P<bits>\d+)\.(?P<field>scale|zero_point|calibrated)$")
    out, grouped = {}, {}
    for key, value in state.items():
        match = old.match(key)
        if match is None:
            out[key] = value
        else:
            grouped.setdefault(match["bank"], {})[(int(match["bits"]), match["field"])] = value
    for prefix, tensors in grouped.items():
        stack = unet.get_submodule(prefix).stack
        fields = {f: getattr(stack, f).detach().cpu().clone()
                  for f in ("scale", "zero_point", "calibrated")}
        for (bits, name), value in tensors.items():
            target = fields[name][stack.slot(bits)]
            target.copy_(value.reshape(target.shape))
        out.update({f"{prefix}.stack.{f}": v for f, v in fields.items()})
    return out


REMEDY = "quantize the model again (`qlip quantize ... --out DIR`)"
# what every quant_config.json holds (read before the model is touched)
REQUIRED = {"base_fingerprint": str, "method": str, "quant_config": dict, "units": list}


def read_config(path: str | Path) -> dict:
    """``quant_config.json`` of a quantized model folder, checked: JSON, format, an integer
    version this qlip reads, and the fields loading needs."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a qlip quantized model folder (no {CONFIG_FILE}); make one with "
            "`qlip quantize ... --out DIR`"
        )
    meta = read_json_dict(config_file, REMEDY)
    check_format(meta, config_file, FORMAT, VERSION, REMEDY)
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            raise CorruptFileError(f"{config_file} is corrupt ({key!r} missing or not a "
                                   f"{kind.__name__}); {REMEDY}")
    meta["version"] = int(meta.get("version", 1))
    return meta


def check_quantized_folder(path: str | Path) -> dict:
    """Everything about a quantized model folder that can be checked without a model: its
    config (:func:`read_config`) and its state file's header. Returns the config."""
    meta = read_config(path)
    state_meta = read_tensor_metadata(Path(path) / STATE_FILE, REMEDY)
    if meta["version"] >= 2:
        check_format(state_meta, Path(path) / STATE_FILE, FORMAT, VERSION, REMEDY)
    return meta


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``quant_state.safetensors`` (a truncated or corrupt file says so)."""
    return load_tensors(Path(path) / STATE_FILE, REMEDY)[0]


def load_quantized(unet: nn.Module, path: str | Path, strict_base: bool = True) -> QuantizedInfo:
    """Quantize ``unet`` (the FP base model, in place) exactly as saved in ``path``."""
    path = Path(path)
    meta = check_quantized_folder(path)
    if strict_base and meta["base_fingerprint"] != fingerprint(unet):
        raise ValueError(
            f"{path} was quantized from a different base model ({meta['base_model']!r}); "
            "load it on top of that model"
        )
    config = QuantConfig.from_dict(meta["quant_config"])
    units = prepare_unet(unet, config)
    if sorted(units) != meta["units"]:
        raise ValueError(f"the quantized layers of {path} do not match this model's layers")
    state = _unpack_codes(unet, read_state(path))
    if meta["version"] < 2:
        state = _upgrade_v1(unet, state)
    extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
    _put_state(unet, units, {k: v for k, v in state.items() if not k.startswith("extra.")})
    return QuantizedInfo(config, meta["method"], meta["method_config"], meta["base_model"], extra)
