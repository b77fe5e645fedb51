"""Each real layer of a UNet step timed alone against the bf16 layer it replaces: which layer shapes
make real W4A8 slower than the best bf16 (issue 14).

The UNet (``--arch``, random weights, bf16, W4A8 RTN as ``sd14_unet_step.py`` builds
``w4a8_layers_real``, ``--packed`` for the packed 4-bit codes) runs one eager step with every real
layer's input recorded. Layers of the same kind and shapes share a row. Each row is timed by GPU
time: ten calls captured in one CUDA graph, its replays timed with CUDA events (median of
``--iters`` replays after ``--warmup``; the first calls tune the tile). ``--timing eager`` times
Python calls instead, host time included: every small layer then reads about 0.12 ms real
against 0.023 ms bf16 (an H100, sixteenth session), the cost of the launches, not of the GPU.

- ``real``: the layer's real kernel (``qlip.quant.real_gemm`` / ``real_conv``), its own input;
- ``real_codes_in_tiles``: the same kernel with every tile rounding its own activation codes
  (``real_gemm.PREQUANTIZE`` off) instead of one launch rounding them once per call;
- ``real_weight_order`` (3×3 convs of int8 codes): the same kernel reading the codes in the
  weight's own order, a strided gather per tap, instead of tap-major;
- ``real_row_sums`` (int8 codes): the same kernel taking the full zero-point bracket, which sums
  every activation tile's rows on the CUDA cores (as before the fourteenth session, and as 8-bit
  weights still do), instead of centered weights that need no row sums;
- ``bf16``: ``F.linear`` / ``F.conv2d`` in bf16 on the same shapes, convolutions channels-last
  (input and weight), as the best bf16 step runs them;
- ``simulated``: the same layer with real execution off (fake quantization, then bf16 math).

Each row also records the largest difference between the two ways of rounding the codes and
between the two zero-point brackets (0: the same integers), and the real output's largest
difference from the simulated one, relative to the latter's largest value. The totals weight each row by how many layers share it: the GPU time a step spends in these
layers each way, by kind (Linear, 1×1 conv, 3×3 conv).

    python benchmarks/real_layer_speed.py --batch 8 --out OUT/real_layer_speed.json

``--extra-ways none`` times ``real``, ``bf16`` and ``simulated`` alone: on a fresh GPU machine
each other way first compiles its own kernel variant (eight tiles for each kind of layer).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

WAYS = ("real", "real_codes_in_tiles", "real_weight_order", "real_row_sums", "bf16", "simulated")
PARTIAL = ("real_weight_order", "real_row_sums")  # ways only some rows have
EXTRA = ("real_codes_in_tiles", "real_weight_order", "real_row_sums")  # --extra-ways may skip them


def extra_ways(text: str) -> tuple[str, ...]:
    """``--extra-ways``: a comma list of :data:`EXTRA` (``all``, ``none``); each one timed costs
    its kernel variant's compilation on a fresh GPU machine (8 tiles each)."""
    if text in ("all", "none"):
        return EXTRA if text == "all" else ()
    ways = tuple(w for w in text.split(",") if w)
    unknown = sorted(set(ways) - set(EXTRA))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ways {unknown}: choose among {', '.join(EXTRA)}"
                                         ", or all, or none")
    return ways


def layer_kind(layer) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` (any other KH×KW: ``conv{KH}x{KW}``), strided
    convs with their stride (the downsamplers: ``conv3x3s2``)."""
    if layer.kind == "linear":
        return "linear"
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    stride = "" if (sh, sw) == (1, 1) else f"s{sh}" if sh == sw else f"s{sh}x{sw}"
    return f"conv{kh}x{kw}{stride}"


def record_inputs(unet, run) -> dict:
    """Run ``run()`` once with a hook on every layer switched to real execution; returns
    ``{key: {"kind", "input", "weight", "count", "layer", "x"}}`` keyed by kind and shapes (the
    first layer of each key and a copy of its input)."""
    rows: dict = {}
    handles = []

    def hook(layer, args, _out):
        x = args[0]
        key = (layer_kind(layer), tuple(x.shape), tuple(layer.weight.shape))
        if key in rows:
            rows[key]["count"] += 1
        else:
            rows[key] = {"kind": key[0], "input": list(key[1]), "weight": list(key[2]),
                         "count": 1, "layer": layer, "x": x.detach().clone()}

    for module in unet.modules():
        if getattr(module, "_real", None) is not None:
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return rows


def channel_major_operands(layer) -> tuple:
    """The conv's real operands with its int8 codes in the weight's own order (``k = c·KH·KW +
    tap``, a strided gather per tap) instead of tap-major, as before the thirteenth session."""
    from qlip.quant.real_conv import channel_major_rows

    ops = layer._real
    return (*ops[:2], channel_major_rows(ops[2], layer.kernel_size), *ops[3:])


def row_sum_operands(layer) -> tuple:
    """The layer's real operands in the full zero-point bracket (``real_gemm.zero_mode`` 2):
    its centered int8 codes with zero points of 0, so that the kernel sums the activations'
    rows again; the same integers, the same output."""
    integer, offset, w, w_sum, _, w_scale = layer._real
    return (integer, offset, w, w_sum, torch.zeros_like(w_sum), w_scale)


def bf16_call(row):
    """The bf16 layer of the row's shapes (random weights; convolutions channels-last)."""
    x, layer = row["x"], row["layer"]
    weight = torch.randn(row["weight"], device=x.device, dtype=x.dtype) * 0.02
    bias = torch.zeros(row["weight"][0], device=x.device, dtype=x.dtype)
    if row["kind"] == "linear":
        return lambda: F.linear(x, weight, bias)
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = weight.contiguous(memory_format=torch.channels_last)
    return lambda: F.conv2d(xc, wc, bias, layer.stride, layer.padding)


def totals(rows: list[dict]) -> dict:
    """ms a step per kind and overall, each way (a row's median times its count; the overall
    total of the ways every row has)."""
    out: dict = defaultdict(lambda: defaultdict(float))
    for row in rows:
        for way in WAYS:
            if way in row:
                out[row["kind"]][way] += row[way] * row["count"]
                if way not in PARTIAL:
                    out["all"][way] += row[way] * row["count"]
    return {k: dict(v) for k, v in out.items()}


def tiles_chosen() -> dict:
    """The tile triton.autotune chose for each key it timed, per kernel (what the rows ran)."""
    from qlip.quant import real_conv, real_gemm

    tuners = {"linear": real_gemm._real_linear_tuned, "linear_packed": real_gemm._packed_linear_tuned,
              "conv": real_conv._conv_tuned, "conv_packed": real_conv._packed_conv_tuned}
    return {name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
            for name, tuner in tuners.items()}


GRAPH_REPEAT = 10  # calls captured in one CUDA graph: a replay's own launch is spread over them


def replayed(call, warmup: int, iters: int, graph_replay) -> dict:
    """GPU time of ``call()`` (ms a call): :data:`GRAPH_REPEAT` calls captured in one CUDA graph
    (after the warm-up calls that tune the tiles), its replays timed, divided by the count. The
    host's launches do not count, as in the compiled step replayed from a graph."""
    def repeated():
        for _ in range(GRAPH_REPEAT):
            call()

    out = graph_replay(repeated, warmup, iters)
    return {k: v / GRAPH_REPEAT if k.endswith("_ms") else v for k, v in out.items()
            if k != "times"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd14", "sdxl"), default="sd14")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--packed", action="store_true", help="the packed 4-bit codes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--extra-ways", type=extra_ways, default=EXTRA,
                        help="besides real, bf16 and simulated: " + ", ".join(EXTRA)
                        + " (comma list; all, the default, or none)")
    parser.add_argument("--timing", choices=("graph", "eager"), default="graph",
                        help="graph (default): GPU time, each way's calls replayed from a CUDA "
                        "graph; eager: CUDA events around Python calls (host time included, as "
                        "before the sixteenth session, when every small layer read about 0.12 ms)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("real_layer_speed.py times CUDA kernels: run it on a GPU")
    from sd14_unet_step import build, graph_replay, inputs
    from sd14_unet_step import timed as eager_timed  # (benchmarks/ is on the path as a script)

    def timed(call, warmup: int, iters: int) -> dict:
        if args.timing == "eager":
            return eager_timed(call, warmup, iters)
        return replayed(call, warmup, iters, graph_replay)

    from qlip.nn import use_real_execution
    from qlip.quant import real_gemm

    variant = "w4a8_layers_real_packed" if args.packed else "w4a8_layers_real"
    unet, _ = build(variant, args)
    x, t, c, kw = inputs(unet, args)
    recorded = record_inputs(unet, lambda: unet(x, t, encoder_hidden_states=c, **kw))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, result = [], {}
    for row in recorded.values():
        layer, inp = row["layer"], row["x"]
        call = functools.partial(layer, inp)  # the real kernel or the simulation, as switched
        with torch.no_grad():
            real = call()
        row["real"] = timed(call, args.warmup, args.iters)["median_ms"]
        # every tile rounding its own codes, as before the thirteenth session
        if "real_codes_in_tiles" in args.extra_ways:
            with mock.patch.object(real_gemm, "PREQUANTIZE", False):
                row["real_codes_in_tiles"] = timed(call, args.warmup, args.iters)["median_ms"]
                with torch.no_grad():
                    # the two ways of rounding the codes give the same integers: the same output
                    row["codes_in_tiles_max_diff"] = float((real - call()).abs().max())
        # the same conv with its codes in the weight's own order
        one_part = len(layer.splits) == 1  # (the extra ways patch one part's operands)
        if layer._real_tap_major and one_part and "real_weight_order" in args.extra_ways:
            with mock.patch.multiple(layer, _real=channel_major_operands(layer),
                                     _real_tap_major=False):
                row["real_weight_order"] = timed(call, args.warmup, args.iters)["median_ms"]
        # centered codes: the same layer with the row sums
        if layer._real[4] is None and one_part and "real_row_sums" in args.extra_ways:
            with mock.patch.object(layer, "_real", row_sum_operands(layer)):
                row["real_row_sums"] = timed(call, args.warmup, args.iters)["median_ms"]
                with torch.no_grad():
                    row["row_sums_max_diff"] = float((call() - real).abs().max())
        row["bf16"] = timed(bf16_call(row), args.warmup, args.iters)["median_ms"]
        use_real_execution(layer, False)
        row["simulated"] = timed(call, args.warmup, args.iters)["median_ms"]
        with torch.no_grad():
            simulated = call().float()
        use_real_execution(layer, True)
        # (row_sums_max_diff: the two brackets give the same integers) the simulation is near
        row["vs_simulated_rel"] = float((real.float() - simulated).abs().max()
                                        / simulated.abs().max())
        rows.append({k: v for k, v in row.items() if k not in ("layer", "x")})
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "arch": args.arch, "batch": args.batch, "variant": variant,
                  "timing": args.timing, "rows": rows,
                  "rows_recorded": len(recorded), "totals_ms": totals(rows),
                  "tiles_chosen": tiles_chosen()}
        args.out.write_text(json.dumps(result, indent=1))  # after each row: a cut run keeps them
        print(f"{row['kind']:8} x{row['count']:2} in {row['input']} w {row['weight']}: " + ", ".join(
            f"{way} {row[way]:.3f} ms" for way in WAYS if way in row)
              + "".join(f"; {k} {row[k]:.3g}" for k in ("codes_in_tiles_max_diff",
                                                          "row_sums_max_diff") if k in row)
              + f"; vs simulated {row['vs_simulated_rel']:.3g}", flush=True)
    for kind, ways in result["totals_ms"].items():
        print(f"{kind}: " + ", ".join(f"{w} {ms:.2f} ms" for w, ms in ways.items())
              + f"; real / bf16 {ways['real'] / ways['bf16']:.2f}")


if __name__ == "__main__":
    main()
