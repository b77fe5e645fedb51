"""A UNet step's attention alone, on the GPU: every attention shape of the SD 1.4 or SDXL UNet at
a batch, timed replayed from a CUDA graph, and the step's total (each shape's time times how
often the UNet runs it):

- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` in bf16 on ``[1, R, N, d]`` (4-D: the
  flash kernel; on 3-D inputs PyTorch 2.11 took a slower path, 17.3 ms for SD 1.4's largest
  shape at batch 8 on an H100, the twenty-first session), what the bf16 step runs;
- ``materialised``: softmax(q·kᵀ) in bf16 as a tensor, its probabilities fake-quantized to 8
  bits, times v (the simulated model's path without the fused kernel, eager);
- ``fused``: :func:`qlip.quant.fused_attention.fused_attention`'s kernel, 8-bit uniform
  probabilities;
- ``fused_log2_first``: the same kernel with DGQ's log2 probabilities (4 bits) and the first key
  kept;
- ``before``: with ``--before FILE``, a saved copy of the fused attention module (the kernel as
  it was before a change), 8-bit uniform, to time a change against its predecessor in one run.

The shapes come from the UNet itself (a forward pre-hook on each attention module during one bf16
call). Writes ``--out`` (JSON) and prints a table.

    python benchmarks/attention_speed.py --arch sd14 --batch 8 --out attention_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from qlip.quant import fused_attention as fa
from qlip.testing import build_unet, unet_step_inputs


def hooked_call(arch: str, batch: int, types: tuple, record, device: str = "cuda") -> None:
    """One bf16 call of the ``arch`` UNet (random weights) at ``batch``, ``record(module, args,
    kwargs)`` a forward pre-hook on every module of ``types``: how the benchmarks read the
    shapes a step runs."""
    unet = build_unet(arch, device, torch.bfloat16)
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for m in unet.modules() if isinstance(m, types)]
    x, t, c, kwargs = unet_step_inputs(unet, batch, device, torch.bfloat16, 0)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=c, **kwargs)
    for hook in hooks:
        hook.remove()
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()


def attention_shapes(arch: str, batch: int, device: str = "cuda") -> Counter:
    """``{(R, N, M, d): count}`` of one UNet call: rows (batch × heads), queries, keys, head dim."""
    from diffusers.models.attention_processor import Attention

    shapes: Counter = Counter()

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        keys = hidden.shape[1] if context is None else context.shape[1]
        d = module.to_q.out_features // module.heads
        shapes[(hidden.shape[0] * module.heads, hidden.shape[1], keys, d)] += 1

    hooked_call(arch, batch, (Attention,), record, device)
    return shapes


def params_uniform(row_max: torch.Tensor) -> torch.Tensor:
    """8 bits over [0, the row's largest probability]."""
    zeros = torch.zeros_like(row_max)
    return torch.stack([row_max / 255, zeros, zeros + 255.0, zeros], dim=1)


def params_log2(row_max: torch.Tensor) -> torch.Tensor:
    """4-bit log2 with Δ the row's largest probability."""
    zeros = torch.zeros_like(row_max)
    return torch.stack([row_max, zeros + 15.0, zeros, zeros], dim=1)


def materialised(q, k, v, scale):
    probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)
    step = probs.amax(dim=(1, 2), keepdim=True) / 255
    return torch.bmm(torch.clamp(torch.round(probs / step), 0, 255) * step, v)


def ways(before) -> dict:
    out = {
        "sdpa": lambda q, k, v, s: F.scaled_dot_product_attention(q[None], k[None], v[None],
                                                                  scale=s)[0],
        "materialised": materialised,
        "fused": lambda q, k, v, s: fa.fused_attention(q, k, v, s, params_uniform, fa.UNIFORM),
        "fused_log2_first": lambda q, k, v, s: fa.fused_attention(q, k, v, s, params_log2,
                                                                  fa.LOG2, keep_first=True),
    }
    if before is not None:
        out["before"] = lambda q, k, v, s: before.fused_attention(q, k, v, s, params_uniform,
                                                                  before.UNIFORM)
    return out


def graph_ms(call, iters: int) -> float:
    """Median ms of one ``call()`` replayed from a CUDA graph (called twice first: autotuning and
    compiling happen outside the capture)."""
    call(), call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def load_before(path: str | None):
    """The saved module at ``path`` as ``qlip.quant._fused_attention_before`` (its relative
    imports resolve in ``qlip.quant``), its custom operators renamed so they do not clash."""
    if path is None:
        return None
    source = Path(path).read_text().replace('"qlip::attention_', '"qlip_before::attention_')
    spec = importlib.util.spec_from_loader("qlip.quant._fused_attention_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "qlip.quant"
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd14", choices=["sd14", "sdxl"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--before", help="a saved copy of qlip/quant/fused_attention.py")
    parser.add_argument("--ways", default="sdpa,materialised,fused,fused_log2_first,before",
                        help="which of the ways to time (comma-separated; before needs --before)")
    parser.add_argument("--largest", type=int, default=0,
                        help="time only this many shapes, the largest (0: every shape; the "
                        "step total then covers those shapes alone)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    chosen = args.ways.split(",")
    variants = {k: w for k, w in ways(load_before(args.before)).items() if k in chosen}
    if "sdpa" not in variants:
        parser.error("--ways must include sdpa (the ratios' baseline)")
    torch.manual_seed(0)
    shapes = attention_shapes(args.arch, args.batch)
    rows, totals = [], Counter()
    order = sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3])
    if args.largest:
        order = order[:args.largest]
    for (r, n, m, d), count in order:
        q, k, v = (torch.randn(r, s, d, device="cuda", dtype=torch.bfloat16) for s in (n, m, m))
        row = {"rows": r, "queries": n, "keys": m, "head_dim": d, "count": count}
        for name, way in variants.items():
            try:
                with torch.no_grad():
                    row[name] = graph_ms(partial(way, q, k, v, d ** -0.5), args.iters)
                totals[name] += count * row[name]
            except Exception as err:  # noqa: BLE001 - a failing way is recorded, the rest go on
                row[name] = f"{type(err).__name__}: {str(err)[-300:]}"
        rows.append(row)
        print(row, flush=True)
        # written after every shape: a run stopped by its time limit keeps the shapes it timed
        out = {"arch": args.arch, "batch": args.batch, "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "shapes": rows, "complete": len(rows) == len(shapes),
               "step_total_ms": dict(totals),
               "ratio_to_sdpa": {k: t / totals["sdpa"] for k, t in totals.items()
                                 if totals["sdpa"]}}
        Path(args.out).write_text(json.dumps(out, indent=2))
    print("step total ms:", {k: round(t, 3) for k, t in totals.items()})
    print("ratio to sdpa:", {k: round(t, 2) for k, t in out["ratio_to_sdpa"].items()})


if __name__ == "__main__":
    main()
