"""Where one UNet step's GPU time goes, per variant of ``sd14_unet_step.py``: the CUDA kernels of a
few steps under ``torch.profiler``, summed by kind (GEMMs, convolutions, attention, layout
conversions, the quantizers, the real int8 kernels, Inductor's fused kernels, the rest), with the
largest kernels by name. What the speed targets turn on: whether the real kernels take less GPU
time than the bf16 GEMMs and convolutions they replace, and what else the step spends.

    python benchmarks/step_profile.py --batch 8 \\
        --variants bf16_channels_last,w4a8_layers_real --out OUT/step_profile.json

Each variant is built as in ``sd14_unet_step.py`` (random weights, bf16), compiled unless
``--no-compile``, warmed up, then ``--steps`` calls are profiled. The variants run one after
another in this process; the JSON is rewritten after each, so a run cut by its time limit keeps
the variants it finished.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# kinds by the kernel's name, first match wins: Inductor's kernels name the ops they fuse
# ("triton_poi_fused_add_convolution_…"), cuDNN's attention says "fprop" and its convolutions
# "…fprop_implicit_gemm…", so Inductor comes first, then attention, convolutions, GEMMs
KINDS = (
    ("real_gemm", r"_real_linear_kernel|_persistent_linear_kernel"),
    ("real_conv", r"_real_conv_kernel|_persistent_conv_kernel"),
    ("unpack", r"_unpack_e4m3_kernel"),
    ("fused_attention", r"_stats_kernel|_output_kernel"),
    ("quantize", r"_fake_quantize_kernel"),
    ("inductor", r"^triton_"),
    ("layout", r"nchwtonhwc|nhwctonchw"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("conv", r"conv|fprop|implicit|winograd|dgrad|wgrad"),
    # (cuBLAS's newer kernels, bf16 and fp8 alike, are named "nvjet_…": an H100 ran the bf16
    # step's Linear layers through them, 4.4 ms a step filed under "other" until the
    # nineteenth session)
    ("gemm", r"gemm|matmul|cutlass|xmma|cublas|splitk|nvjet"),
)


def kind(name: str) -> str:
    """The kind of a CUDA kernel, by its name (``other`` where no pattern matches)."""
    low = name.lower()
    for label, pattern in KINDS:
        if re.search(pattern, low):
            return label
    return "other"


def summarise(events: list[tuple[str, float]], steps: int, top: int = 15) -> dict:
    """``events``: (kernel name, total GPU µs over ``steps`` steps). Milliseconds per step by
    kind and for the ``top`` largest kernels."""
    by_kind: dict[str, float] = defaultdict(float)
    for name, micros in events:
        by_kind[kind(name)] += micros / 1000 / steps
    largest = sorted(events, key=lambda e: -e[1])[:top]
    return {"gpu_ms_per_step": sum(by_kind.values()),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "largest_kernels": [{"name": n[:160], "kind": kind(n), "ms_per_step": m / 1000 / steps}
                                for n, m in largest]}


def profile_variant(variant: str, args) -> dict:
    from sd14_unet_step import build, inputs  # (benchmarks/ is on the path when run as a script)

    unet, _ = build(variant, args)
    x, t, c, kw = inputs(unet, args)
    forward = torch.compile(unet.forward) if args.compile else unet.forward
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.warmup):  # the first includes compiling (Triton's tiles, Inductor)
            forward(x, t, encoder_hidden_states=c, **kw)
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                forward(x, t, encoder_hidden_states=c, **kw)
            torch.cuda.synchronize()
    events = []
    for e in prof.key_averages():
        micros = getattr(e, "self_device_time_total", None)
        if micros is None:  # older torch
            micros = e.self_cuda_time_total
        if micros > 0:
            events.append((e.key, float(micros)))
    return {"compiled": args.compile, "as_captured": args.as_captured, "warmup_s": warm_s,
            "steps": args.steps,
            **summarise(events, args.steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd14", "sdxl"), default="sd14")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="bf16_channels_last,w4a8_layers,w4a8_layers_real")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--as-captured", action="store_true",
                        help="eager calls take the kernels and tiles a CUDA graph's capture takes "
                             "(the persistent Linear and conv kernels at their fixed tiles, no "
                             "autotuning): with --no-compile, the replayed step's real kernels "
                             "without its compile")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import sd14_unet_step

    if not torch.cuda.is_available():
        raise SystemExit("step_profile.py profiles CUDA kernels: run it on a GPU")
    if args.as_captured:
        from qlip.quant import real_gemm

        real_gemm.capturing = lambda t: t.is_cuda  # (real_conv asks real_gemm too)
    unknown = [v for v in args.variants.split(",") if v not in sd14_unet_step.VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sd14_unet_step.VARIANTS}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "arch": args.arch, "batch": args.batch, "variants": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        out["variants"][variant] = profile_variant(variant, args)
        args.out.write_text(json.dumps(out, indent=1))
        row = out["variants"][variant]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in row["by_kind_ms"].items())
        print(f"{variant}: {row['gpu_ms_per_step']:.2f} ms GPU a step ({kinds})", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
