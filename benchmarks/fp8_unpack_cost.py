"""Where the packed fp8 model's time goes, on the GPU: every fp8 GEMM shape of the SDXL (or SD 1.4)
UNet at a batch, timed alone replayed from a CUDA graph, and the step's total (each shape's time
times how often the UNet runs it):

- ``bf16``: ``x @ wᵀ`` in bf16 (cuBLAS), what the bf16 step runs;
- ``fp8``: :func:`qlip.quant.real_fp8.fp8_linear` on e4m3 weights kept in memory (the unpacked
  model; compiled, fast accumulation as the step's ``fp8_fast`` variants);
- ``fp8_packed``: the same on packed 4-bit bytes, unpacked to e4m3 at every call by PyTorch ops
  that Inductor compiles (the packed model's path);
- ``unpack_inductor``: that unpacking alone, compiled;
- ``fp8_packed_unpack``: the same with ``real_gemm.UNPACK_PACKED``, the unpacking one
  hand-written Triton launch (:func:`qlip.quant.real_fp8.unpack_e4m3`, an opaque custom
  operator in the compiled graph);
- ``unpack_triton``: that kernel alone, to learn whether Inductor's unpacking is where the
  packed model loses.

The twenty-third session timed the packed fp8 SDXL step at batch 8 at 1.098× bf16 channels-last
(135.70 against 123.58 ms) where the twentieth session's unpacked fp8 step ran at 0.92×; this
script says how much of that the unpacking explains. Shapes come from the UNet (a forward
pre-hook on every ``nn.Linear`` and 1×1 ``nn.Conv2d`` during one bf16 call); weights are random.
Writes ``--out`` (JSON) and prints a table; ``--plot`` draws the step totals (PNG), also from
an earlier run's JSON without a GPU (``--from``).

    python benchmarks/fp8_unpack_cost.py --arch sdxl --batch 8 --out fp8_unpack_cost.json
    python benchmarks/fp8_unpack_cost.py --from fp8_unpack_cost.json --plot fp8_unpack_cost.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch import nn

from qlip.quant import real_fp8, real_gemm
from qlip.quant.real_gemm import centered_codes, pack_rows, unpack_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_speed import graph_ms, hooked_call  # noqa: E402


def gemm_shapes(arch: str, batch: int, device: str = "cuda") -> Counter:
    """``{(M, N, K): count}`` of one UNet call's Linear layers and 1×1 convs."""
    shapes: Counter = Counter()

    def record(module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if isinstance(module, nn.Linear):
            shapes[(x.numel() // x.shape[-1], module.out_features, module.in_features)] += 1
        elif module.kernel_size == (1, 1):
            shapes[(x.numel() // x.shape[1], module.out_channels, module.in_channels)] += 1

    hooked_call(arch, batch, (nn.Linear, nn.Conv2d), record, device)
    return shapes


def operands(m: int, n: int, k: int, device: str = "cuda") -> dict:
    """Random operands of one shape: activations, bf16 weights, packed codes and their e4m3 form."""
    g = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g, device=device)
    zero = torch.randint(4, 12, (n,), generator=g, device=device)
    scale = torch.rand(n, generator=g, device=device) * 1e-2 + 1e-3
    w8, scale_b, _ = real_fp8.fp8_weights(codes - zero[:, None], None, scale)
    packed, scale_p, zero_p = real_fp8.fp8_weights(pack_rows(codes), zero, scale, k=k)
    table = torch.tensor([[0.05, -127.0, 127.0]], device=device)
    return {"x": torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16),
            "w": ((codes - zero[:, None]) * scale[:, None]).to(torch.bfloat16),
            "w8": w8, "scale_b": scale_b, "packed": packed, "zero": zero_p,
            "table": table, "choice": torch.zeros(1, dtype=torch.long, device=device),
            "step": torch.zeros(1, dtype=torch.long, device=device)}


def plot_totals(result: dict, path: str) -> None:
    """A bar a way: the step's fp8 GEMMs (or their unpacking alone) in ms, from ``result``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"bf16": "bf16 (cuBLAS)", "fp8": "fp8, e4m3 weights in memory",
              "fp8_packed": "fp8, packed: Inductor's unpacking",
              "fp8_packed_unpack": "fp8, packed: one Triton launch",
              "unpack_inductor": "unpacking alone: Inductor",
              "unpack_triton": "unpacking alone: Triton"}
    totals = result["step_total_ms"]
    names = [n for n in labels if n in totals]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    bars = ax.barh([labels[n] for n in names], [totals[n] for n in names],
                   color=["#777777" if n == "bf16" else "#4c72b0" if n.startswith("fp8")
                          else "#dd8452" for n in names])
    ax.bar_label(bars, fmt="%.1f ms", padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(totals.values()) * 1.2)
    ax.set_xlabel("ms a step: each shape alone, replayed from a CUDA graph, × its count")
    ax.set_title(f"{result['arch'].upper()} UNet, batch {result['batch']}: its "
                 f"{result['gemm_calls']} fp8 GEMMs ({result['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sdxl", choices=["sd14", "sdxl"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/fp8_unpack_cost.json")
    parser.add_argument("--plot", metavar="PNG", help="the step totals as a bar chart")
    parser.add_argument("--from", dest="source", metavar="JSON",
                        help="no GPU: plot an earlier run's --out (with --plot)")
    args = parser.parse_args()
    if args.source:
        if not args.plot:
            parser.error("--from plots an earlier run: give --plot PNG")
        plot_totals(json.loads(Path(args.source).read_text()), args.plot)
        return
    real_fp8.FAST_ACCUM = True

    def fp8_call(o, packed: bool):
        w8, zero = (o["packed"], o["zero"]) if packed else (o["w8"], None)
        return real_fp8.fp8_linear(o["x"], o["table"], o["choice"], o["step"], 1, w8,
                                   o["scale_b"], zero, None)

    # dynamic shapes: one compile a function for every shape (static ones would recompile per
    # shape, past Dynamo's limit of 8, after which it runs eager)
    fp8 = torch.compile(lambda o: fp8_call(o, False), dynamic=True)
    fp8_packed = torch.compile(lambda o: fp8_call(o, True), dynamic=True)
    unpack = torch.compile(lambda o: real_fp8.fp8_weight_matrix(o["packed"], o["zero"],
                                                                o["x"].shape[1]), dynamic=True)
    fp8_packed_unpack = torch.compile(lambda o: fp8_call(o, True), dynamic=True)

    def with_kernel(flag: bool, call):
        def run(o):  # the switch is read while tracing (and guarded): one value a function
            real_gemm.UNPACK_PACKED = flag
            return call(o)
        return run

    ways = {"bf16": lambda o: o["x"] @ o["w"].t(), "fp8": with_kernel(False, fp8),
            "fp8_packed": with_kernel(False, fp8_packed),
            "fp8_packed_unpack": with_kernel(True, fp8_packed_unpack),
            "unpack_inductor": with_kernel(False, unpack),
            "unpack_triton": lambda o: real_fp8.unpack_e4m3(o["packed"], o["zero"],
                                                            o["x"].shape[1])}
    rows = []
    shapes = gemm_shapes(args.arch, args.batch)
    for (m, n, k), count in sorted(shapes.items(), key=lambda s: -s[0][0] * s[0][1] * s[0][2]):
        if n % 16 or k % 16:  # torch._scaled_mm's rule: such layers stay on the integer kernels
            continue
        o = operands(m, n, k)
        # against the PyTorch ops themselves (fp8_weight_matrix would follow UNPACK_PACKED)
        exact = torch.equal(real_fp8.unpack_e4m3(o["packed"], o["zero"], k).float(),
                            centered_codes(unpack_rows(o["packed"], k), o["zero"]).float())
        row = {"m": m, "n": n, "k": k, "count": count, "triton_unpack_exact": exact}
        row |= {name: graph_ms(partial(call, o), args.iters) for name, call in ways.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del o
    totals = {name: sum(r[name] * r["count"] for r in rows) for name in ways}
    out = {"arch": args.arch, "batch": args.batch, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "shapes": rows, "step_total_ms": totals,
           "unique_shapes": len(rows), "gemm_calls": sum(r["count"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("step totals (ms):", {k: round(v, 2) for k, v in totals.items()})
    if args.plot:
        plot_totals(out, args.plot)


if __name__ == "__main__":
    main()
