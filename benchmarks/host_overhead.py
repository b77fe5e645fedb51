"""The host's share of an eager quantized UNet step, measurable on any CPU: the SD 1.4 UNet
topology (every block, attention and layer of it: 282 quantized units) with 8 channels per
block instead of 320–1280, 8×8 latents and a 77×16 context, so that kernel time is negligible
and what is left is the per-call cost of Python and of launching operations, which is what
bounds the eager GPU step (issue 9: eager W4A8 layers against eager bf16).

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json

It reports the median time of FP32 and of W4A8 (layers only; layers + attention) steps, and
their ratio to FP32, after warm-up, variants taking turns. A CPU number, not the GPU's: it
tracks code changes to the host path, not the device's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import QuantConfig
from qlip.pipeline import prepare_unet
from qlip.testing import SD14_UNET_CONFIG

VARIANTS = ("fp32", "w4a8_layers", "w4a8_attention", "w4_bank_8_16_32")


def build(variant: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(SD14_UNET_CONFIG, block_out_channels=(8, 8, 8, 8), cross_attention_dim=16,
                  norm_num_groups=4, attention_head_dim=2)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    if variant != "fp32":
        options = (8, 16, 32) if variant == "w4_bank_8_16_32" else (8,)
        quant = QuantConfig(wbits=4, abits=8, abits_options=options,
                            quantize_attention=variant == "w4a8_attention")
        units = prepare_unet(unet, quant)
        x, t, c = inputs()
        quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(2, dtype=torch.long)),
                     progress=False)
    return unet


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500]),
            torch.randn(2, 77, 16, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/host_overhead.json")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {v: build(v) for v in VARIANTS}
    x, t, c = inputs()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        for v in VARIANTS:  # warm-up
            for _ in range(3):
                models[v](x, t, encoder_hidden_states=c)
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                start = time.perf_counter()
                for _ in range(args.iters):
                    models[v](x, t, encoder_hidden_states=c)
                times[v].append((time.perf_counter() - start) / args.iters * 1e3)
    median = {v: statistics.median(ts) for v, ts in times.items()}
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "median_ms": median, "ratio_to_fp32": {v: median[v] / median["fp32"] for v in VARIANTS},
              "times_ms": times, "iters": args.iters, "rounds": args.rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for v in VARIANTS:
        print(f"{v:16s} {median[v]:8.2f} ms  x{result['ratio_to_fp32'][v]:.2f}")


if __name__ == "__main__":
    main()
