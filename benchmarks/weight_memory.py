"""Memory of a loaded W4 UNet's weights, with and without packed weights, against bf16.

The SD 1.4 UNet architecture (published config, seeded random weights) is quantized W4A8 with RTN
on random inputs, saved, loaded again onto a fresh copy, once as usual and once with
``--packed-weights`` (``qlip.nn.pack_weights``: 4-bit codes two per byte, the FP weights freed),
and measured:

- ``tensor_bytes``: the bytes of the storage its parameters and buffers hold, and its real
  execution's operands, each storage once, in bf16 (after one call, so an unpacked layer's
  dequantized-weight cache is counted);
- the same in fp8 (``use_real_execution(fp8=True)``, the CPU too), unpacked (an e4m3 copy of
  each fp8 layer's codes) and packed (each fp8 layer unpacks its own bytes per call);
- on CUDA also ``torch.cuda.memory_allocated`` with only that model on the device;
- the parts: the packed codes, the FP tensors of the layers left unquantized (norms, ...), and the
  quantizers' state (weight scales and zero points, activation tables);
- that the packed model's output equals the unpacked one's for the same input;
- on CUDA, the packed model with its Linear layers and convs run for real
  (``qlip.nn.use_real_execution``: each call unpacks a layer's bytes for its kernel) and the
  unpacked one run for real (which keeps an int8 copy of the codes): ``memory_allocated`` after one call each.

Issue 14's target: a loaded W4 UNet's weight memory ≤ 0.3× bf16.

    python benchmarks/weight_memory.py --device cuda --out benchmarks/results/weight_memory.h200.json
    python benchmarks/weight_memory.py --device cpu  --out benchmarks/results/weight_memory.cpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
from pathlib import Path

import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import (
    QuantConfig,
    QuantLayer,
    pack_weights,
    quant_units,
    tensor_bytes,
    use_real_execution,
)
from qlip.pipeline import load_quantized, prepare_unet
from qlip.pipeline.saving import QuantizedInfo, save_quantized
from qlip.testing import build_sd14_unet

BF16 = 2  # bytes per bf16 element


def _inputs(device: str, dtype: torch.dtype, latent: int, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(2, 4, latent, latent, generator=g, device=device, dtype=dtype)
    c = torch.randn(2, 77, 768, generator=g, device=device, dtype=dtype)
    return x, torch.tensor([500, 500], device=device), c


def _parts(unet) -> dict[str, int]:
    """Bytes by kind: packed codes, quantizer state, everything else (FP tensors)."""
    codes = quant = 0
    for unit in quant_units(unet).values():
        for name, buf in unit.named_buffers():
            if name.startswith("weight_nibbles_") or name.startswith("weight_codes_"):
                codes += buf.untyped_storage().nbytes()
            elif "quantizers." in name or "act_banks." in name or "banks." in name:
                quant += buf.untyped_storage().nbytes()
    return {"codes": codes, "quantizer_state": quant,
            "other": tensor_bytes(unet) - codes - quant}


def _cuda_allocated(model_fn) -> int | None:
    if not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = model_fn()
    gc.collect()
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated() - before
    del model
    return used


def _real_loaded(load, packed: bool, device: str, latent: int, fp8: bool):
    """A loaded model run for real (``use_real_execution``, ``fp8`` for its A8 GEMM layers),
    after one call: ``(unet, its output, how many layers were switched)``."""
    unet = load(packed)
    switched = use_real_execution(unet, fp8=fp8)
    x, t, c = _inputs(device, unet.dtype, latent)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=c).sample
    return unet, out, switched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=32, help="calibration latent size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # CPU: fp32 kernels

    base = build_sd14_unet(device, dtype)
    base_params = sum(p.numel() for p in base.parameters())
    bf16_bytes = base_params * BF16
    template = copy.deepcopy(base).cpu()  # the FP base for the loads (kept off the device)

    config = QuantConfig(wbits=4, abits=8)
    units = prepare_unet(base, config)
    x, t, c = _inputs(device, dtype, args.latent, seed=1)
    quantize_rtn(base, units, CalibrationSet(x, t.float(), c, torch.zeros(2, dtype=torch.long)),
                 progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(base, QuantizedInfo(config, "rtn", {}, "sd14-architecture"), tmp)
        del base, units
        gc.collect()

        def load(packed: bool):
            unet = copy.deepcopy(template)
            load_quantized(unet, tmp)
            if packed:
                pack_weights(unet)
            return unet.to(device, torch.bfloat16 if device.startswith("cuda") else dtype)

        rows = {}
        outputs = {}
        for name, packed in (("unpacked", False), ("packed", True)):
            unet = load(packed)
            x, t, c = _inputs(device, unet.dtype, args.latent)
            with torch.no_grad():
                outputs[name] = unet(x, t, encoder_hidden_states=c).sample.float().cpu()
            # after a call an unpacked layer holds its dequantized-weight cache too; measured in
            # bf16 (a CPU run computes in fp32, then converts)
            unet.to(torch.bfloat16)
            size = tensor_bytes(unet)
            parts = _parts(unet)
            layers = [m for m in unet.modules() if isinstance(m, QuantLayer)]
            rows[name] = {
                "tensor_bytes": size,
                "vs_bf16": size / bf16_bytes,
                "parts": parts,
                "quantized_layers": len(layers),
                "packed_layers": sum(m.packed for m in layers),
                "dtype": str(unet.dtype),
            }
            del unet
            gc.collect()
            rows[name]["cuda_allocated"] = _cuda_allocated(lambda p=packed: load(p))
        # fp8 (use_real_execution(fp8=True): the A8 GEMM layers in e4m3, the CPU too), after
        # one call: unpacked, each such layer keeps an e4m3 copy of its codes; packed, it
        # unpacks its own bytes at every call, so the model holds the packed bytes alone (its
        # 3×3 convs' int8 operands are their packed bytes too)
        for name, packed in (("unpacked_fp8", False), ("packed_fp8", True)):
            unet, out, fp8_layers = _real_loaded(load, packed, device, args.latent, fp8=True)
            outputs[name] = out.float().cpu()
            del out
            unet.to(torch.bfloat16)  # (measured in bf16, as above)
            size = tensor_bytes(unet)
            rows[name] = {"tensor_bytes": size, "vs_bf16": size / bf16_bytes,
                          "parts": _parts(unet), "real_layers": fp8_layers,
                          "fp8_layers": sum(m._real_fp8 for m in unet.modules()
                                            if isinstance(m, QuantLayer)),
                          "dtype": str(unet.dtype)}
            del unet
            gc.collect()
    equal = torch.equal(outputs["packed"], outputs["unpacked"])
    result_fp8_equal = torch.equal(outputs["packed_fp8"], outputs["unpacked_fp8"])
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "unet": "SD 1.4 architecture, random weights",
        "parameters": base_params,
        "bf16_bytes": bf16_bytes,
        "rows": rows,
        "outputs_equal": equal,
        "fp8_outputs_equal": result_fp8_equal,
        "target_packed_vs_bf16": 0.3,
    }
    if device.startswith("cuda"):
        result["bf16_cuda_allocated"] = _cuda_allocated(lambda: template.to(device, torch.bfloat16))

        def real(packed: bool, fp8: bool):  # run for real, after one call
            unet, _, switched = _real_loaded(load, packed, device, args.latent, fp8)
            if not fp8:
                result.setdefault("real_linear_layers", switched)
            return unet

        for name, packed, fp8 in (("unpacked_fp8", False, True), ("packed_fp8", True, True),
                                  ("unpacked_real", False, False), ("packed_real", True, False)):
            used = _cuda_allocated(lambda p=packed, f=fp8: real(p, f))
            rows.setdefault(name, {}).update(cuda_allocated=used,
                                             cuda_vs_bf16=used / result["bf16_cuda_allocated"])
    for name, row in rows.items():
        if "tensor_bytes" in row:
            print(f"{name:13s} {row['tensor_bytes'] / 2**20:9.1f} MiB  {row['vs_bf16']:.3f}x bf16  "
                  "parts (MiB): " + ", ".join(f"{k} {v / 2**20:.1f}"
                                               for k, v in row["parts"].items()))
        if row.get("cuda_allocated") is not None and "cuda_vs_bf16" in row:
            print(f"{name:13s} CUDA allocated {row['cuda_allocated'] / 2**20:9.1f} MiB  "
                  f"{row['cuda_vs_bf16']:.3f}x bf16")
    print(f"bf16 weights {bf16_bytes / 2**20:.1f} MiB; packed output equals unpacked: {equal}; "
          f"in fp8: {result_fp8_equal}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
