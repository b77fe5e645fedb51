"""Time of DGQ's grouped activation quantizer (qlip.quant.grouped.StackedGrouped) on the whole
batch, with its combined tables (one division, one clamp, one multiplication: four passes)
against the seven passes it replaced (a division, a clamp and a multiplication per candidate
dim), at the shapes of the reference model's unfolded convs and of a Linear input; on the CPU
and, where there is one, the GPU. Both must give the same values (the JSON says so per row).

    python benchmarks/grouped_quantizer_speed.py --out benchmarks/results/grouped_quantizer.cpu.json
    python benchmarks/grouped_quantizer_speed.py --devices cuda --batch 250 --out ...  # an eval's batch

At the default batch of 8 the GPU times are launch-bound (about 0.1 ms a call on the H200, for
both), and the module call's own host work (row lookup, shape checks) is in the combined time
only; --batch 250 gives the tensors of `qlip eval`'s batches, where the passes over memory count.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from qlip.quant.grouped import StackedGrouped

# (name, shape without the batch, candidate dims): an unfolded 3x3 conv [B, C*9, L] and a Linear
# input [B, N, C]
SHAPES = [("unfolded conv 64ch 16x16", (64 * 9, 256), (-2, -1)),
          ("unfolded conv 128ch 8x8", (128 * 9, 64), (-2, -1)),
          ("linear 256 tokens x 128", (256, 128), (-1, -2))]


def seven_passes(q: StackedGrouped, x: torch.Tensor, slot: int, step: int) -> torch.Tensor:
    """The previous forward: each dim's Δ, bounds and Δ again, one op each."""
    row = slot * q.chosen_dim.numel() + step
    out = x
    tables = []
    for i, dim in enumerate(q._dims):
        shape = [1] * x.ndim
        shape[dim] = -1
        tables.append([p.to(x.dtype).reshape(shape) for p in getattr(q, f"table_{i}")[row]])
    for scale, _, _ in tables:
        out = out / scale
    out = torch.round(out)
    for _, low, high in tables:
        out = torch.clamp(out, low, high)
    for scale, _, _ in tables:
        out = out * scale
    return out


def quantizer(shape, dims, device, dtype) -> StackedGrouped:
    sizes = tuple(shape[d] for d in dims)
    q = StackedGrouped((4, 8), groups=8, dims=dims, num_steps=1)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (sizes[0],), generator=g)
    low = -torch.rand(8, generator=g) * 4 - 0.5
    q.set_groups(0, sizes, 0, labels, low, low.abs() * 2)
    return q.to(device)


def _once(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_pair(first, second, device, rounds) -> tuple[float, float]:
    """Median seconds of two functions, timed alternately (a loaded machine slows both)."""
    for fn in (first, second, first, second):  # warm
        fn()
    a, b = [], []
    for _ in range(rounds):
        a.append(_once(first, device))
        b.append(_once(second, device))
    return sorted(a)[rounds // 2], sorted(b)[rounds // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated; cuda is skipped where there is none")
    args = parser.parse_args()
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    rows = []
    with torch.inference_mode():
        for device in devices:
            for dtype in (torch.float32, torch.bfloat16):
                for name, sample_shape, dims in SHAPES:
                    shape = (args.batch, *sample_shape)
                    q = quantizer(shape, dims, device, dtype)
                    x = torch.randn(shape, device=device, dtype=dtype) * 3
                    slot, step = torch.tensor(1, device=device), torch.zeros(1, dtype=torch.long,
                                                                             device=device)
                    new, old = timed_pair(partial(q, x, slot, step=step),
                                          partial(seven_passes, q, x, 1, 0), device, args.rounds)
                    same = torch.equal(q(x, slot, step=step), seven_passes(q, x, 1, 0))
                    rows.append({"device": device, "dtype": str(dtype).removeprefix("torch."),
                                 "shape": name, "elements": x.numel(), "seven_passes_ms":
                                 old * 1e3, "combined_ms": new * 1e3, "speedup": old / new,
                                 "equal": same})
                    print(rows[-1])
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "rounds": args.rounds, "batch": args.batch, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
