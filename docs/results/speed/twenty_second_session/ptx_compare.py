"""Twenty-second session: the fused attention kernels at 1080686 and at ceaa3e7 compiled for sm_90
on the CPU (Triton 3.6, as on the GPU; pointers and N, M with the launcher's 16-divisibility),
bf16, head dim 40, BLOCK_M 128, BLOCK_N 64, 8-bit uniform: each kernel's instruction counts, and
each loop body's (the instructions from a label to the branch back to it).

Run from the repository root: PYTHONPATH=<triton 3.6>:src python
docs/results/speed/twenty_second_session/ptx_compare.py > ptx_compare.txt"""

import re
import sys
from collections import Counter
from pathlib import Path

from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention_speed import load_before  # noqa: E402 (the saved module, its operators renamed)

from qlip.quant import fused_attention  # noqa: E402

KERNELS = {  # name: (kernel attribute, pointer types, constexprs)
    "stats": ("_stats_kernel",
              {"q_ptr": "*bf16", "k_ptr": "*bf16", "m_ptr": "*fp32", "l_ptr": "*fp32",
               "m1_ptr": "*fp32", "scale2": "fp32"},
              {"HEAD_D": 40, "LOWP": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}),
    "output": ("_output_kernel",
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
                "m_ptr": "*fp32", "inv_ptr": "*fp32", "p_ptr": "*fp32", "scale2": "fp32"},
               {"HEAD_D": 40, "MODE": 0, "KEEP_FIRST": False, "LOWP": True, "BLOCK_M": 128,
                "BLOCK_N": 64, "BLOCK_D": 64}),
}
SHOWN = ("cp.async.cg.shared.global", "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
         "ex2.approx.ftz.f32", "bar.sync", "st.shared.v4.b32")


def ptx(module, name: str) -> list[str]:
    attribute, pointers, constants = KERNELS[name]
    kernel = getattr(module, attribute)
    params = list(kernel.arg_names)
    signature = {p: pointers.get(p, "constexpr" if p in constants else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p.endswith("_ptr") or p in ("N", "M")}
    compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constants,
                                        attrs=attrs), target=GPUTarget("cuda", 90, 32))
    return [line.strip() for line in compiled.asm["ptx"].splitlines()]


def opcodes(lines: list[str]) -> Counter:
    """The instructions' opcodes (a predicated one's after its guard)."""
    ops = [line.split()[1] if line.startswith("@") else line.split()[0]
           for line in lines if re.match(r"^@?%?[a-z]", line)]
    return Counter(ops)


def loops(lines: list[str]) -> dict[str, Counter]:
    """Each loop's body: from a label to the last branch back to it."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line))}
    out = {}
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            out[m.group(1)] = opcodes(lines[labels[m.group(1)]:i + 1])
    return out


modules = {"old": load_before(str(ROOT / "docs/results/speed/twenty_second_session/"
                                         "fused_attention_1080686.py")),
           "new": fused_attention}
for name in KERNELS:
    counts = {}
    for tag, module in modules.items():
        lines = ptx(module, name)
        counts[tag] = opcodes(lines)
        print(tag, name, "instructions", sum(counts[tag].values()),
              {op: counts[tag][op] for op in SHOWN})
        for label, body in loops(lines).items():
            print(tag, name, "loop", label, "instructions", sum(body.values()),
                  {op: body[op] for op in SHOWN})
    old, new = counts["old"], counts["new"]
    print(name, "op-count differences old -> new:",
          {op: (old[op], new[op]) for op in sorted(old | new) if old[op] != new[op]})
