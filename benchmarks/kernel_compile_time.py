"""How long Triton takes to compile each autotune tile of the real GEMM and convolution kernels
for Hopper (sm_90), on this machine's CPU, without a GPU: what a real model's first call pays per
tile and flag combination before its kernels run (autotune compiles every tile).

    PYTHONPATH=src python benchmarks/kernel_compile_time.py --out compile_time.json

The kernels' signatures come from ``tests/engine/test_kernels_compile.py`` (bf16, a 3×3 conv).
Set ``TRITON_CACHE_DIR`` to an empty folder: compiled kernels are cached. On this project's
2-core CPU (Triton 3.9, twelfth session), with the conv's nine taps unrolled, its tiles took
8.0-48.6 s each (207 s for the eight); with the taps in one loop, 1.3-4.1 s (21 s); the GEMM's,
1.2-3.4 s (17 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import time
from pathlib import Path

from qlip.quant import real_gemm

CASES = Path(__file__).resolve().parents[1] / "tests" / "engine" / "test_kernels_compile.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("kernel_cases", CASES)
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    rows = []
    for name, make in (("real_linear", cases._real_linear), ("real_conv_3x3", cases._real_conv)):
        for tile in real_gemm.TILES:
            kernel, pointers, constants = make(tile)(args.dtype)
            params = inspect.signature(kernel.fn).parameters
            signature = {p: pointers.get(p, "constexpr" if p in constants else "i32")
                         for p in params}
            start = time.perf_counter()
            triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": tile[3], "num_stages": tile[4]})
            rows.append({"kernel": name, "tile": list(tile), "seconds": time.perf_counter() - start})
            print(f"{name} {tile}: {rows[-1]['seconds']:.1f} s", flush=True)
    totals = {k: sum(r["seconds"] for r in rows if r["kernel"] == k)
              for k in ("real_linear", "real_conv_3x3")}
    out = {"dtype": args.dtype, "target": "sm_90", "rows": rows, "total_s": totals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
