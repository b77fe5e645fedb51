"""Does Inductor compile a UNet whose layers run for real, and does the compiled model follow the
bits? The tests' tiny UNet at W4 with the bank A{4,8,16}, every Linear and conv real
(``qlip.nn.use_real_execution``; the kernels are the custom operators ``torch.ops.qlip.real_*``),
compiled with ``torch.compile`` (Inductor) once; then each option under ``fail_on_recompile``
against the eager real model. Writes the first call's seconds (the compile), the differences
and whether anything recompiled.

    python benchmarks/real_compile_check.py --out real_compile.json                 # on a GPU
    TRITON_INTERPRET=1 QLIP_AUTOTUNE=0 python benchmarks/real_compile_check.py --device cpu \\
        --out /tmp/real_compile.json           # the kernels under Triton's interpreter, on a CPU

On the CPU (2 cores, Triton 3.9's interpreter, torch 2.13, eleventh session) the first call took
109 s cold (18-24 s with Inductor's on-disk caches warm); the compiled outputs equalled the eager real model's at A4 and A8 and were 4.5e-5 from it
at A16, with no recompilation. Sixteenth session, with the codes as PyTorch ops of the graph
(``real_gemm.CODES_IN_GRAPH``), the downsamplers and the split-input convs real (83 real
layers): 81 s, the same equality at A4 and A8, 1.8e-6 at A16, no recompilation.

``--options 4,8`` takes an integer-only bank: the kernels never read x, and the compiled graph
hands each operator its codes and no x (None).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import QuantConfig, use_real_execution
from qlip.pipeline import prepare_unet
from qlip.quant import fused_quantize
from qlip.testing import build_tiny_pipeline, step_at_bits


def inputs(unet, batch: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    c = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=g)
    return x.to(device), torch.full((batch,), 500, device=device), c.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--options", default="4,8,16",
                        help="the activation bank, comma-separated bits (default 4,8,16)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    options = tuple(int(b) for b in args.options.split(","))
    if args.device == "cpu":
        if fused_quantize.triton is None:
            sys.exit("the kernels need Triton: on a CPU, install it and set TRITON_INTERPRET=1")
        # the interpreter runs the kernels on CPU tensors
        fused_quantize.available = lambda x: x.dtype in fused_quantize.DTYPES
    unet = build_tiny_pipeline(Path(tempfile.mkdtemp())).unet.to(args.device)
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=options))
    x, t, c = inputs(unet, 4, 1, args.device)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(4, dtype=torch.long)),
                 progress=False)
    x, t, c = inputs(unet, 2, 2, args.device)
    real = use_real_execution(unet)

    def run(fn, bits):
        return step_at_bits(fn, units, bits, x, t, c)

    start = time.perf_counter()
    eager = {bits: run(unet, bits) for bits in options}
    # the kernels' first calls: Triton compiles every tile (for each flag combination) and times
    # it on each layer shape, unless QLIP_AUTOTUNE=0; Inductor comes after
    if args.device == "cuda":
        torch.cuda.synchronize()
    eager_first_s = time.perf_counter() - start
    print(f"eager real calls (autotune included): {eager_first_s:.1f} s", flush=True)
    compiled = torch.compile(unet.forward)
    start = time.perf_counter()
    run(compiled, options[0])
    first_call_s = time.perf_counter() - start
    diffs, recompiled = {}, False
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for bits in options:
                diffs[f"A{bits}"] = float((run(compiled, bits) - eager[bits]).abs().max())
    except RuntimeError as err:  # the stance raises on a recompile
        recompiled = f"{type(err).__name__}: {str(err)[:300]}"
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "options": list(options), "real_layers": real, "autotune": not fused_quantize.fixed_tile(),
           "eager_first_calls_s": eager_first_s, "first_call_s": first_call_s,
           "max_abs_compiled_vs_eager_real": diffs, "recompiled": recompiled}
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
