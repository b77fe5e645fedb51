"""Twenty-second session: the fused attention kernels at 1080686 and now (ceaa3e7) compiled for sm_90 on
the CPU (Triton 3.6, as on the GPU; pointers and N, M with the launcher's 16-divisibility), bf16,
head dim 40, BLOCK_M 128, BLOCK_N 64, 8-bit uniform: the instruction counts of each loop body.
Run: PYTHONPATH=<triton 3.6> python ptx_compare.py (writes /tmp/ptxcmp/*.ptx)."""
import importlib.util, inspect, os, re, sys
os.makedirs("/tmp/ptxcmp", exist_ok=True)
sys.path.insert(0, "/work/main/src")
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def load(path, name):
    src = open(path).read().replace('"qlip::attention_', f'"{name}::attention_')
    spec = importlib.util.spec_from_loader(f"qlip.quant.{name}", loader=None)
    mod = importlib.util.module_from_spec(spec); mod.__package__ = "qlip.quant"
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod

out = {}
for tag, path in [("old", "/work/main/docs/results/speed/twenty_second_session/fused_attention_1080686.py"),
                  ("new", "/work/main/src/qlip/quant/fused_attention.py")]:
    fa = load(path, "m_" + tag)
    for kname, kernel, ptrs, consts in [
        ("stats", fa._stats_kernel, {"q_ptr": "*bf16", "k_ptr": "*bf16", "m_ptr": "*fp32", "l_ptr": "*fp32", "m1_ptr": "*fp32", "scale2": "fp32"},
         {"HEAD_D": 40, "LOWP": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}),
        ("output", fa._output_kernel, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "m_ptr": "*fp32", "inv_ptr": "*fp32", "p_ptr": "*fp32", "scale2": "fp32"},
         {"HEAD_D": 40, "MODE": 0, "KEEP_FIRST": False, "LOWP": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64})]:
        params = inspect.signature(kernel.fn).parameters
        sig = {p: ptrs.get(p, "constexpr" if p in consts else "i32") for p in params}
        names = list(params)
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(names)
                 if p.endswith("_ptr") or p in ("N", "M")}
        c = triton_compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32))
        ptx = c.asm["ptx"]
        body = [l.strip() for l in ptx.splitlines() if l.strip() and not l.strip().startswith(("//", ".loc", ".file", "$L__", "@%p"))]
        instr = [l for l in body if re.match(r"^[a-z]", l)]
        ops = {}
        for l in instr:
            op = l.split()[0]; ops[op] = ops.get(op, 0) + 1
        out[(tag, kname)] = (len(instr), ops, ptx)
        print(tag, kname, "instructions", len(instr), "cp.async", sum(v for k, v in ops.items() if k.startswith("cp.async")), "mma", sum(v for k, v in ops.items() if "mma" in k), "branches", ops.get("bra", 0) + ops.get("bra.uni", 0))
for k in ("stats", "output"):
    a, b = out[("old", k)][1], out[("new", k)][1]
    diff = {op: (a.get(op, 0), b.get(op, 0)) for op in set(a) | set(b) if a.get(op, 0) != b.get(op, 0)}
    print(k, "op-count differences old->new:", diff)
    open(f"/tmp/ptxcmp/{k}_old.ptx", "w").write(out[("old", k)][2]); open(f"/tmp/ptxcmp/{k}_new.ptx", "w").write(out[("new", k)][2])

import os
os.chdir("/tmp/ptxcmp")
for k in ("stats", "output"):
    for tag in ("old", "new"):
        lines = [l.strip() for l in open(f"{k}_{tag}.ptx")]
        labels = {}
        for i, l in enumerate(lines):
            m = re.match(r"^(\$L__\w+):", l)
            if m: labels[m.group(1)] = i
        for i, l in enumerate(lines):
            m = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", l)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                body = [x for x in lines[labels[m.group(1)]:i+1] if re.match(r"^@?%?[a-z]", x) and not x.startswith(("//", ".loc"))]
                ops = {}
                for x in body:
                    op = x.split()[1] if x.startswith("@") else x.split()[0]
                    ops[op] = ops.get(op, 0) + 1
                key = {o: ops.get(o, 0) for o in ("cp.async.cg.shared.global", "cp.async.ca.shared.global", "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", "ex2.approx.ftz.f32", "bar.sync", "ld.shared.v4.b32", "ld.global.v4.b32", "st.shared.v4.b32")}
                print(k, tag, "loop", m.group(1), "instructions", len(body), key)
