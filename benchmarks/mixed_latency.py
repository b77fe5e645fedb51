"""Latency against FAB under mixed real execution (issue 14: "under QLIP, latency falls as FAB
falls"): one SD 1.4 UNet-architecture step (random weights, bf16, ``--batch`` images, default 2,
64×64 latents) at W4 with the bank {8, 16}, its Linear layers and convs run for real
(``qlip.nn.use_real_execution``: int8 math at A8, bf16 math at A16, chosen on the device), and
a share f of the units at 8 bits, the rest at 16, for f = 0, 0.25, 0.5, 0.75, 1. The units
at 8 bits are a seeded random draw, and each share's draw contains the one before it.

A16 layers read their dequantized weights, stored once (``--no-float-weights``: dequantized
from the codes in every tile, as before the eighteenth session). The model runs channels-last
with its attention unquantized (the step benchmark's real variants), unless
``--channels-first`` or ``--attention`` (q, k, v and the probabilities
fake-quantized at 8 bits, simulated: the seventeenth session's run had it, which added
about 23 ms to every share at batch 8 on an H100). With ``--compile`` on a GPU the same UNet in
bf16, compiled and replayed from a CUDA graph, is timed first: the best bf16, for ratios.

Each assignment is timed by CUDA-graph replay (GPU work only; the bits are data, so one captured
graph per assignment is the same graph with other table values) and by eager calls. The same is
measured with the simulation (real execution off) for comparison. ``--compile`` adds the real model compiled once (the real kernels
are custom operators in its graph), run at every share under ``fail_on_recompile``: one graph for
every assignment. Writes the JSON and ``mixed_latency.png`` (latency against FAB).

    python benchmarks/mixed_latency.py --out benchmarks/results/mixed_latency.h200.json
    python benchmarks/mixed_latency.py --device cpu --tiny --out /tmp/mixed.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sd14_unet_step import graph_replay  # noqa: E402  (this folder: the scripts' own timers)
from sd14_unet_step import timed as cuda_timed  # noqa: E402

from qlip.methods.calib_data import CalibrationSet  # noqa: E402
from qlip.methods.rtn import quantize_rtn  # noqa: E402
from qlip.nn import QuantConfig, quant_units, use_real_execution  # noqa: E402
from qlip.pipeline import prepare_unet  # noqa: E402
from qlip.testing import build_sd14_unet, build_tiny_pipeline  # noqa: E402

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def model(args):
    b = args.batch
    if args.tiny:
        import tempfile

        unet = build_tiny_pipeline(Path(tempfile.mkdtemp())).unet.to(args.device)
        size, context = unet.config.sample_size, unet.config.cross_attention_dim
        shape, ctx = (b, unet.config.in_channels, size, size), (b, 8, context)
    else:
        unet = build_sd14_unet(args.device, torch.bfloat16)
        shape, ctx = (b, 4, 64, 64), (b, 77, 768)
    dtype = next(unet.parameters()).dtype
    g = torch.Generator(args.device).manual_seed(0)
    x = torch.randn(*shape, generator=g, device=args.device, dtype=dtype)
    c = torch.randn(*ctx, generator=g, device=args.device, dtype=dtype)
    t = torch.full((b,), 500, device=args.device)
    if not args.channels_first:  # before quantizing (as sd14_unet_step.build)
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = bf16_reference(unet, (x, t, c), args) if args.compile and args.device == "cuda" else None
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=(8, 16),
                                           quantize_attention=args.attention))
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(b, dtype=torch.long)),
                 progress=False)
    return unet, quant_units(unet), (x, t, c), bf16


def bf16_reference(unet, inputs, args) -> float:
    """The unquantized UNet's step, compiled and replayed from a CUDA graph (median ms); the
    compiled code is dropped afterwards, so that the quantized model compiles afresh."""
    x, t, c = inputs
    compiled = torch.compile(unet.forward)
    with torch.no_grad():
        compiled(x, t, encoder_hidden_states=c)
    ms = graph_replay(lambda: compiled(x, t, encoder_hidden_states=c).sample, args.warmup,
                      args.iters)["median_ms"]
    torch._dynamo.reset()
    return ms


def assignments(units, seed: int) -> dict[float, dict[str, int]]:
    """For each share f: the units at 8 bits, a prefix of one seeded random order."""
    names = [n for n, u in units.items() if u.dynamic]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    out = {}
    for share in SHARES:
        low = {names[i] for i in order[: round(share * len(names))]}
        out[share] = {n: (8 if n in low else 16) for n in names}
    return out


def apply(units, bits: dict[str, int]) -> None:
    """Set each unit that ``bits`` names (one of :func:`assignments`) to its bits."""
    for name, b in bits.items():
        units[name].set_bits(b)


def fab(units, bits: dict[str, int]) -> float:
    """The MAC-unweighted FAB of the Linear/Conv units (fixed ones at their own bits)."""
    layers = [(n, u) for n, u in units.items() if u.fab_member]
    return statistics.mean(bits.get(n, u.default_bits) for n, u in layers)


def median_ms(call, device: str, warmup: int, iters: int) -> float:
    """Median ms of ``call()``: CUDA events on the GPU (sd14_unet_step's timer), the wall clock
    elsewhere."""
    if device == "cuda":
        return cuda_timed(call, warmup, iters)["median_ms"]
    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (a smoke run)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2, help="images in the step")
    parser.add_argument("--compile", action="store_true",
                        help="also the compiled real model (one torch.compile serving every "
                             "share, recompiles forbidden), timed as the eager one")
    parser.add_argument("--attention", action="store_true",
                        help="also quantize attention (simulated: q, k, v and probabilities)")
    parser.add_argument("--channels-first", action="store_true",
                        help="run the model channels-first (the real convs then copy to NHWC)")
    parser.add_argument("--no-float-weights", dest="float_weights", action="store_false",
                        help="A16 layers dequantize their codes in every tile instead of "
                             "reading stored dequantized weights (before the eighteenth session)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.batch < 1:
        raise SystemExit("--batch takes at least 1")
    unet, units, (x, t, c), bf16_ms = model(args)
    real_layers = use_real_execution(unet, float_weights=args.float_weights)
    model_mib = torch.cuda.memory_allocated() / 2**20 if args.device == "cuda" else None

    def step():
        return unet(x, t, encoder_hidden_states=c).sample

    compiled = None
    if args.compile:  # compiled once, before any timing; every share then runs this graph
        compiled = torch.compile(unet.forward)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x, t, encoder_hidden_states=c)
        compile_s = time.perf_counter() - start
        with torch.no_grad():  # a layer whose real path cannot run (the CPU) falls back to the
            # simulation, whose first call refills the dequantized-weight cache that use_real
            # freed: the graph's guards then see a cache and recompile once, here
            compiled(x, t, encoder_hidden_states=c)

    def compiled_step():
        return compiled(x, t, encoder_hidden_states=c).sample

    plan = assignments(units, args.seed)
    compiled_times = {}
    if compiled is not None:  # first, while the model is as compiled (switching real execution
        # off and on would change what the graph's guards check, and recompile)
        for share, bits in plan.items():
            apply(units, bits)
            with torch.compiler.set_stance("fail_on_recompile"):
                times = {"real_compiled_ms": median_ms(compiled_step, args.device, args.warmup,
                                                       args.iters)}
                if args.device == "cuda":
                    times["real_compiled_graph_ms"] = graph_replay(
                        compiled_step, args.warmup, args.iters)["median_ms"]
            compiled_times[share] = times
    rows = []
    for share, bits in plan.items():
        apply(units, bits)
        row = {"share_at_8": share, "fab": fab(units, bits)}
        for mode, on in (("real", True), ("simulated", False)):
            use_real_execution(unet, on, float_weights=args.float_weights)
            row[f"{mode}_eager_ms"] = median_ms(step, args.device, args.warmup, args.iters)
            if args.device == "cuda":
                row[f"{mode}_graph_ms"] = graph_replay(step, args.warmup, args.iters)["median_ms"]
        row.update(compiled_times.get(share, {}))
        rows.append(row)
        print(row, flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny, "batch": args.batch,
              "real_linear_layers": real_layers, "bank": [8, 16],
              "attention_quantized": args.attention, "channels_last": not args.channels_first,
              "float_weights": args.float_weights, "model_mib_real": model_mib, "rows": rows}
    if compiled is not None:
        result["compile_s"] = compile_s
    if bf16_ms is not None:  # the best bf16, and each share's compiled real step against it
        result["bf16_compiled_graph_ms"] = bf16_ms
        for row in rows:
            row["real_compiled_graph_vs_bf16"] = row["real_compiled_graph_ms"] / bf16_ms
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    mode = "graph" if args.device == "cuda" else "eager"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for kind, style in (("real", "o-"), ("simulated", "s--")):
        ax.plot([r["fab"] for r in rows], [r[f"{kind}_{mode}_ms"] for r in rows], style,
                label=(f"{kind} ({real_layers} layers real)" if args.device == "cuda" else
                       f"{kind} ({real_layers} layers switched; they run real on CUDA only)")
                if kind == "real" else kind)
    if compiled is not None:
        key = "real_compiled_graph_ms" if args.device == "cuda" else "real_compiled_ms"
        ax.plot([r["fab"] for r in rows], [r[key] for r in rows], "^-", label="real, compiled")
    if bf16_ms is not None:
        ax.axhline(bf16_ms, color="0.3", ls=":", label="bf16, compiled (no quantization)")
    ax.set_xlabel("FAB (share of units at A8, the rest A16)")
    ax.set_ylabel(f"step latency, ms ({mode})")
    ax.set_title(f"W4 bank {{8,16}}, batch {args.batch}, attention "
                 f"{'quantized' if args.attention else 'in bf16'}"
                 f"{'' if args.float_weights else ', A16 dequantized in the tiles'}: latency against FAB "
                 f"({result['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out.with_name("mixed_latency.png"), dpi=110)


if __name__ == "__main__":
    main()
