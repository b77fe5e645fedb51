"""One denoising step of the Stable Diffusion 1.4 UNet architecture (published config, random
weights, 512×512 → 64×64 latents, guidance batch of 2, context 2×77×768): bf16 vs simulated W4A8,
eager and compiled. Writes JSON; run on the GPU:

    python benchmarks/sd14_unet_step.py --out benchmarks/results/sd14_unet_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import QuantConfig
from qlip.pipeline import prepare_unet
from qlip.testing import build_sd14_unet


def inputs(device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(2, 4, 64, 64, generator=g, device=device, dtype=dtype)
    c = torch.randn(2, 77, 768, generator=g, device=device, dtype=dtype)
    return x, torch.tensor([500, 500], device=device), c


def time_step(unet, args, warmup: int, iters: int) -> dict:
    x, t, c = args
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        unet(x, t, encoder_hidden_states=c)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        for _ in range(warmup):
            unet(x, t, encoder_hidden_states=c)
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            unet(x, t, encoder_hidden_states=c)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "first_call_s": first}


def quantized_unet(device, dtype, attention: bool):
    unet = build_sd14_unet(device, dtype)
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, quantize_attention=attention))
    x, t, c = inputs(device, dtype, seed=1)
    data = CalibrationSet(x, t.float(), c, torch.zeros(2, dtype=torch.long))
    quantize_rtn(unet, units, data, progress=False)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/sd14_unet_step.json")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile-budget-s", type=float, default=420.0,
                        help="skip further compiled variants once this much time has passed")
    args = parser.parse_args()
    device, dtype = "cuda", torch.bfloat16
    began = time.perf_counter()
    variants = {
        "bf16": lambda: build_sd14_unet(device, dtype),
        "w4a8_layers_attention": lambda: quantized_unet(device, dtype, attention=True),
        "w4a8_layers": lambda: quantized_unet(device, dtype, attention=False),
    }
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "batch": 2, "latent": [4, 64, 64], "context": [77, 768], "dtype": "bfloat16",
               "variants": {}}
    x = inputs(device, dtype)
    for name, build in variants.items():
        unet = build()
        results["variants"][f"{name}_eager"] = time_step(unet, x, args.warmup, args.iters)
        print(name, "eager", results["variants"][f"{name}_eager"], flush=True)
        if time.perf_counter() - began < args.compile_budget_s:
            compiled = torch.compile(unet)
            results["variants"][f"{name}_compiled"] = time_step(compiled, x, args.warmup, args.iters)
            print(name, "compiled", results["variants"][f"{name}_compiled"], flush=True)
        del unet
        torch.cuda.empty_cache()
    base = results["variants"]["bf16_eager"]["median_ms"]
    for v in results["variants"].values():
        v["ratio_vs_bf16_eager"] = v["median_ms"] / base
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{'variant':<34}{'median ms':>10}{'x bf16':>8}")
    for name, v in results["variants"].items():
        print(f"{name:<34}{v['median_ms']:>10.2f}{v['ratio_vs_bf16_eager']:>8.2f}")


if __name__ == "__main__":
    main()
