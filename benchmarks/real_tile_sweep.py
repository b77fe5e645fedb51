"""Every tile of the real kernels timed by itself on the UNet's largest shapes, beside the bf16
layer, and the codes kernel at other block sizes (issue 14): whether the tile list holds what
the int8 tensor cores want, measured instead of guessed.

Autotune keeps one tile per shape and records nothing of the others; here each candidate
(``qlip.quant.real_gemm.TILES`` and ``--extra-tiles``) runs alone through
``real_gemm.FORCE_TILE`` on one layer (random W4 codes, A8, bf16 input, int8 codes rounded
once: the eager step's path), timed with ``triton.testing.do_bench`` (median ms). ``gemm_tiles``
times the same launches given the codes, as a compiled step runs them (its graph computes the
codes, fused into the kernel that produces the layer's input): the GEMM alone, to set beside
bf16. ``persistent_tiles`` times the same codes through the persistent TMA kernel
(``real_gemm.PERSISTENT``, an integer-only layer's path), beside ``gemm_graph_tiles``, the
one-tile-a-program kernel on them, both replayed from a CUDA graph (no host work counted); the
3×3 convs' rows the same with ``real_conv.PERSISTENT`` (tiles whose pixels are whole rows only).
Each row also times the same layer in bf16 (``F.linear``; ``F.conv2d`` channels-last, from a
graph too for the convs), and the codes kernel alone. A tile that cannot launch (shared memory) is recorded as such.

    python benchmarks/real_tile_sweep.py --out OUT/real_tile_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_resources import tiles_arg  # (benchmarks/ is on the path when run as a script)

# (kind, M or (B, C, H, W), N, K or 3×3): the step's heaviest Linear and conv shapes at batch 8,
# SD 1.4 (64×64 latents) and SDXL (128×128 latents: attention at 64×64 and 32×32 tokens)
SHAPES = {
    "sd14": ([(32768, 320, 320), (32768, 2560, 320), (32768, 320, 1280), (8192, 5120, 640),
              (8192, 640, 2560), (2048, 10240, 1280)],
             [((8, 320, 64, 64), 320), ((8, 640, 32, 32), 640), ((8, 1280, 16, 16), 1280),
              ((8, 1280, 32, 32), 1280)]),
    "sdxl": ([(32768, 640, 640), (32768, 5120, 640), (32768, 640, 2560), (8192, 1280, 1280),
              (8192, 10240, 1280), (8192, 1280, 5120)],
             [((8, 320, 128, 128), 320), ((8, 640, 64, 64), 640), ((8, 1280, 32, 32), 1280),
              ((8, 640, 128, 128), 320)]),
}
EXTRA_TILES = "128,128,128,8,4 128,256,128,8,3 128,256,64,8,4 128,64,128,4,4"
CODES = [(1024, 4), (2048, 4), (4096, 8), (8192, 8)]  # (block, warps) of the codes kernel


def operands(n: int, k: int, device: str, seed: int = 0):
    """A W4A8 layer's real operands: ``(table, choice, step, steps, integer, offset, w, w_sum,
    w_zero, w_scale, bias)`` (per-tensor A8 grid, centered int8 W4 codes)."""
    from qlip.quant import real_gemm
    from qlip.quant.stacked import StackedUniform

    g = torch.Generator().manual_seed(seed)
    acts = StackedUniform((8,))
    acts.slot_view(8).calibrate(torch.randn(4096, generator=g))
    codes = torch.randint(0, 16, (n, k), generator=g)
    w = real_gemm.weight_operands(codes, torch.rand(n, generator=g) * 0.01 + 1e-3,
                                  torch.full((n,), 8.0), 4)
    integer, offset = real_gemm.int8_offsets((8,))
    choice = torch.zeros(1, dtype=torch.long)
    table = acts.to(device)._flat_table(torch.bfloat16)
    bias = torch.randn(n, generator=g)
    side = [t.to(device) if t is not None else None for t in (integer, offset, *w)]
    return (table, choice.to(device), choice.to(device), 0, *side,
            bias.to(device, torch.bfloat16))


def bench(fn) -> float | str:
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=10, rep=40))
    except Exception as error:  # (a tile over the shared memory: triton's OutOfResources)
        return f"{type(error).__name__}: {str(error)[:120]}"


def bench_graph(fn) -> float | str:
    """Median ms of ``fn`` replayed from a CUDA graph (as a compiled step runs it): the host's
    work, such as the persistent kernel's TMA descriptors, is left out."""
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception as error:  # noqa: BLE001 (a tile that cannot launch is a result)
        return f"{type(error).__name__}: {str(error)[:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra-tiles", type=tiles_arg, default=tiles_arg(EXTRA_TILES))
    parser.add_argument("--tiles", type=tiles_arg, default=None,
                        help="the tiles to time instead of real_gemm.TILES and --extra-tiles")
    parser.add_argument("--kinds", default="linear,conv,codes")
    parser.add_argument("--arch", choices=sorted(SHAPES), default="sd14",
                        help="whose Linear and 3×3 conv shapes (batch 8)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("real_tile_sweep.py times kernels on a CUDA GPU")
    from tqdm import tqdm

    from qlip.quant import real_conv, real_gemm

    tiles = args.tiles or list(dict.fromkeys([*real_gemm.TILES, *args.extra_tiles]))
    linears, convs = SHAPES[args.arch]
    kinds = args.kinds.split(",")
    rows = []
    started = time.perf_counter()
    out_path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "arch": args.arch,
            "tiles": [list(t) for t in tiles], "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}, indent=1))

    with torch.no_grad():
        if "linear" in kinds:
            for m, n, k in tqdm(linears, desc="linear shapes"):
                ops = operands(n, k, "cuda")
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                row = {"kind": "linear", "shape": [m, n, k],
                       "bf16": bench(partial(F.linear, x, weight, ops[-1])),
                       "codes": bench(partial(real_gemm.int8_codes, x, *ops[:6])), "tiles": {},
                       "gemm_tiles": {}, "gemm_graph_tiles": {}, "persistent_tiles": {}}
                codes = real_gemm.int8_codes(x, *ops[:6])
                for tile in tiles:
                    real_gemm.FORCE_TILE = tile
                    name = ",".join(map(str, tile))
                    row["tiles"][name] = bench(partial(real_gemm.real_linear, x, *ops))
                    row["gemm_tiles"][name] = bench(partial(real_gemm._launch_linear, x, codes,
                                                            *ops))
                    # the persistent TMA kernel on the same codes (an integer-only layer: x
                    # None), both kernels replayed from a CUDA graph
                    row["gemm_graph_tiles"][name] = bench_graph(partial(
                        real_gemm._launch_linear, None, codes, *ops))
                    real_gemm.PERSISTENT = True
                    row["persistent_tiles"][name] = bench_graph(partial(
                        real_gemm._launch_linear, None, codes, *ops))
                    real_gemm.PERSISTENT = False
                real_gemm.FORCE_TILE = None
                rows.append(row)
                save()
        if "conv" in kinds:
            for (b, c, h, w), n in tqdm(convs, desc="conv shapes"):
                ops = list(operands(n, c * 9, "cuda"))
                ops[6] = real_conv.tap_major_rows(ops[6], (3, 3))  # as use_real keeps int8 codes
                x = torch.randn(b, c, h, w, device="cuda", dtype=torch.bfloat16).to(
                    memory_format=torch.channels_last)
                weight = torch.randn(n, c, 3, 3, device="cuda", dtype=torch.bfloat16).to(
                    memory_format=torch.channels_last)
                row = {"kind": "conv3x3", "shape": [b, c, h, w, n],
                       "bf16": bench(partial(F.conv2d, x, weight, ops[-1], padding=1)),
                       "codes": bench(partial(real_conv.padded_codes, x.permute(0, 2, 3, 1),
                                              *ops[:6], (1, 1))), "tiles": {}, "gemm_tiles": {},
                       "gemm_graph_tiles": {}, "persistent_tiles": {},
                       "bf16_graph": bench_graph(partial(F.conv2d, x, weight, ops[-1], padding=1))}
                codes = real_conv.padded_codes(x.permute(0, 2, 3, 1), *ops[:6], (1, 1))
                shape = ([3, 3], [1, 1], True, [1, 1])
                for tile in tiles:
                    real_gemm.FORCE_TILE = tile
                    name = ",".join(map(str, tile))
                    row["tiles"][name] = bench(partial(
                        real_conv.real_conv2d, x, *ops, kernel_size=(3, 3), padding=(1, 1),
                        tap_major=True))
                    row["gemm_tiles"][name] = bench(partial(
                        real_conv._launch_conv2d, x, codes, *ops, *shape))
                    # the codes alone (an integer-only conv), one tile a program and persistent
                    # (where the tile's pixels are whole rows: real_conv.conv_box), both
                    # replayed from a CUDA graph
                    real_conv.PERSISTENT = False
                    row["gemm_graph_tiles"][name] = bench_graph(partial(
                        real_conv._launch_conv2d, None, codes, *ops, *shape, None, True))
                    if real_conv.conv_box(h, w, tile[0]) is not None:
                        real_conv.PERSISTENT = True
                        row["persistent_tiles"][name] = bench_graph(partial(
                            real_conv._launch_conv2d, None, codes, *ops, *shape, None, True))
                    real_conv.PERSISTENT = None
                real_gemm.FORCE_TILE = None
                rows.append(row)
                save()
        if "codes" in kinds:
            x = torch.randn(32768, 1280, device="cuda", dtype=torch.bfloat16)
            ops = operands(8, 8, "cuda")
            row = {"kind": "codes", "shape": list(x.shape), "blocks": {}}
            for block, warps in CODES:
                real_gemm.CODES_BLOCK, real_gemm.CODES_WARPS = block, warps
                row["blocks"][f"{block},{warps}"] = bench(partial(real_gemm.int8_codes, x, *ops[:6]))
            real_gemm.CODES_BLOCK, real_gemm.CODES_WARPS = 1024, 4
            # the bandwidth bound: read bf16, write int8
            row["copy_bf16_ms"] = bench(x.clone)
            rows.append(row)
            save()
    for r in rows:
        if r["kind"] == "codes":
            print(f"codes {r['shape']}: {r['blocks']} (bf16 clone {r['copy_bf16_ms']:.3f} ms)")
            continue
        timed = {t: v for t, v in r["tiles"].items() if isinstance(v, float)}
        best = min(timed, key=timed.get) if timed else None
        gemm = {t: v for t, v in r["gemm_tiles"].items() if isinstance(v, float)}
        best_gemm = min(gemm, key=gemm.get) if gemm else None
        persistent = {t: v for t, v in r.get("persistent_tiles", {}).items()
                      if isinstance(v, float)}
        best_p = min(persistent, key=persistent.get) if persistent else None
        graphed = {t: v for t, v in r.get("gemm_graph_tiles", {}).items() if isinstance(v, float)}
        best_g = min(graphed, key=graphed.get) if graphed else None
        graph_bf16 = (f" (from a graph {r['bf16_graph']:.3f})"
                      if isinstance(r.get("bf16_graph"), float) else "")
        print(f"{r['kind']} {r['shape']}: bf16 {r['bf16']:.3f} ms{graph_bf16}, codes "
              f"{r['codes']:.3f} ms, "
              f"best tile {best} {timed.get(best, float('nan')):.3f} ms, GEMM alone "
              f"{best_gemm} {gemm.get(best_gemm, float('nan')):.3f} ms"
              + (f"; from a CUDA graph: GEMM {best_g} {graphed[best_g]:.3f} ms, persistent "
                 f"{best_p} {persistent[best_p]:.3f} ms" if best_p and best_g else "") + "; "
              + ", ".join(f"{t} {v:.3f}" for t, v in timed.items()))


if __name__ == "__main__":
    main()
