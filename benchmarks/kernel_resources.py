"""What each real kernel's tiles compile to on Hopper, read without a GPU: registers, spills,
shared memory, and whether the K loop multiplies with ``wgmma`` and copies its tiles
asynchronously (issue 14; device time is scarce, the compiler's report is free).

Every tile of ``qlip.quant.real_gemm.TILES`` is compiled for sm_90 by Triton's own front end and
ptxas (the Triton installed here; the GPU machines have 3.6.0), for the int8 GEMM and the 3×3
conv, int8 and packed codes, with the argument specialisation Triton's launcher gives the UNet's
shapes: pointers 16-byte aligned and the dimensions named by ``--divisible`` multiples of 16 (the
launcher specialises every integer argument that is). ``cuobjdump`` (shipped with Triton) then
reads the machine code:

- ``regs``, ``stack`` (bytes a thread spills to local memory), ``smem`` (bytes);
- ``wgmma``: Hopper's warpgroup MMA instructions (SASS ``IGMMA`` for int8, ``HGMMA`` for the
  bf16 path), ``mma``: the older ``IMMA``/``HMMA``;
- ``cp_async``: ``LDGSTS`` (global → shared copies the software pipeline issues ahead);
- ``ldl``/``stl``: local-memory loads and stores (spills);
- ``byte_loads``: global loads of one byte (``LDG…U8``): a tile read a byte at a time.

    python benchmarks/kernel_resources.py --out OUT/kernel_resources.json
    python benchmarks/kernel_resources.py --divisible N,K --out OUT/c_not_16.json  # C = 4, say
    python benchmarks/kernel_resources.py --tiles "128,128,128,8,4 128,256,128,8,3" --out OUT/t.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

# a pointer argument's element type, by name (the activations' dtype where None)
POINTERS = {"x_ptr": None, "out_ptr": None, "table_ptr": None, "bias_ptr": None, "a_ptr": "i8",
            "choice_ptr": "i64", "step_ptr": "i64", "integer_ptr": "i32", "offset_ptr": "i32",
            "w_sum_ptr": "i32", "w_zero_ptr": "i32", "w_scale_ptr": "fp32", "wf_ptr": None}
DIMENSIONS = ("N", "K", "KB", "C", "H", "W", "H_OUT", "W_OUT", "stride_xm", "stride_wn", "stride_om",
              "stride_fn")
# the kernels this reads: int8 codes, packed codes, and int8 codes whose float options read
# stored dequantized weights (``_float``: QLIP's A16 beside A8, real_gemm.float_weights)
KERNELS = ("linear", "linear_packed", "linear_float", "conv", "conv_packed", "conv_float")
SASS_OPS = {"wgmma": ("IGMMA", "HGMMA"), "mma": ("IMMA", "HMMA"), "cp_async": ("LDGSTS",),
            "ldl": ("LDL",), "stl": ("STL",)}


def sass_summary(resources: str, sass: str) -> dict:
    """``cuobjdump --dump-resource-usage`` and ``--dump-sass`` text → the counts above."""
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", resources))
    ops = Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                             sass, re.M))
    out = {"regs": int(usage.get("REG", 0)), "stack": int(usage.get("STACK", 0))}
    out.update({name: sum(ops[o] for o in codes) for name, codes in SASS_OPS.items()})
    # single-byte loads from global memory: a tile read one byte at a time, not 16 (cp.async)
    out["byte_loads"] = len(re.findall(r"\bLDG(?:\.[A-Z0-9_]+)*\.U8\b", sass))
    out["instructions"] = sum(ops.values())
    return out


def constants(kernel: str, tile) -> dict:
    block = dict(BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])
    common = dict(HAS_STEPS=True, HAS_BIAS=True, IEEE=False, PACKED=kernel.endswith("packed"),
                  PRE=True, ZERO=int(kernel.endswith("packed")),  # centered int8 / packed
                  FLOAT_W=kernel.endswith("float"))
    if kernel.startswith("conv"):  # codes tap-major, as QuantLayer.use_real keeps them (a
        # packed conv's own bytes since the sixteenth session: pairs of channels, C even)
        common.update(KH=3, KW=3, PH=1, PW=1, TAP_MAJOR=True, PAIRED=common["PACKED"])
    return common | block


def compile_tile(kernel: str, tile, divisible: set[str]):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qlip.quant import real_conv, real_gemm

    fn = real_conv._real_conv_kernel if kernel.startswith("conv") else real_gemm._real_linear_kernel
    consts = constants(kernel, tile)
    params = list(inspect.signature(fn.fn).parameters)
    w_type = "*u8" if consts["PACKED"] else "*i8"
    signature = {p: ("constexpr" if p in consts else w_type if p == "w_ptr"
                     else f"*{POINTERS[p] or 'bf16'}" if p in POINTERS else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if signature[p].startswith("*") or p in divisible}
    start = time.perf_counter()
    compiled = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": tile[3], "num_stages": tile[4]})
    seconds = time.perf_counter() - start
    return compiled, seconds


def read_cubin(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        texts = [subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                                check=True).stdout for flag in ("--dump-resource-usage", "--dump-sass")]
    return sass_summary(*texts)


def tiles_arg(text: str) -> list[tuple[int, ...]]:
    """``--tiles``: "M,N,K,warps,stages ..." → tiles; each a power of two but the stages."""
    tiles = []
    for item in text.split():
        parts = item.split(",")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r}: give BLOCK_M,BLOCK_N,BLOCK_K,warps,stages")
        tile = tuple(int(p) for p in parts)
        if any(v & (v - 1) for v in tile[:4]):
            raise argparse.ArgumentTypeError(f"{item!r}: blocks and warps are powers of two")
        tiles.append(tile)
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="linear,linear_packed,conv,conv_packed")
    parser.add_argument("--divisible", default=",".join(DIMENSIONS),
                        help="integer arguments the launcher sees as multiples of 16")
    parser.add_argument("--tiles", type=tiles_arg, default=None,
                        help="candidate tiles instead of real_gemm.TILES: space-separated "
                        "BLOCK_M,BLOCK_N,BLOCK_K,warps,stages")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; choose among {', '.join(KERNELS)}")
    try:
        import triton
    except ImportError:
        raise SystemExit("kernel_resources.py needs Triton (pip install triton); no GPU is "
                         "needed") from None
    from tqdm import tqdm

    from qlip.quant import real_gemm

    divisible = {d for d in args.divisible.split(",") if d}
    rows = []
    pairs = [(kernel, tile) for kernel in kernels for tile in args.tiles or real_gemm.TILES]
    for kernel, tile in tqdm(pairs, desc="tiles", leave=False):
        compiled, seconds = compile_tile(kernel, tile, divisible)
        rows.append({"kernel": kernel, "tile": list(tile), "compile_s": round(seconds, 2),
                     "smem": compiled.metadata.shared} | read_cubin(compiled.asm["cubin"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90",
                                    "divisible": sorted(divisible), "rows": rows}, indent=1))
    print(f"Triton {triton.__version__}, sm_90; multiples of 16: {', '.join(sorted(divisible))}")
    print(f"{'kernel':14} {'tile (M, N, K, warps, stages)':30} {'regs':>4} {'spill B':>7} "
          f"{'smem KB':>7} {'wgmma':>5} {'mma':>4} {'cp.async':>8} {'LDL+STL':>7} {'LDG.U8':>6}")
    for r in rows:
        print(f"{r['kernel']:14} {str(tuple(r['tile'])):30} {r['regs']:>4} {r['stack']:>7} "
              f"{r['smem'] / 1024:>7.0f} {r['wgmma']:>5} {r['mma']:>4} {r['cp_async']:>8} "
              f"{r['ldl'] + r['stl']:>7} {r['byte_loads']:>6}")


if __name__ == "__main__":
    main()
