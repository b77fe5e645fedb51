"""Cost of Q-Diffusion's BRECQ/AdaRound reconstruction on the Stable Diffusion 1.4 UNet
architecture (published config, random weights, 64×64 latents, context 77×768): time per
reconstruction iteration (batch 8, median over iterations) of every reconstruction unit, a ResNet
block and a transformer block singled out, and the projected time of a whole reconstruction at a
given number of iterations per unit. Optionally, Q-Diffusion W4A8 end to end on the reference model.
Run on the GPU:

    python benchmarks/reconstruction_speed.py --out benchmarks/results/reconstruction_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.calib_data import CalibrationSet
from qlip.methods.calibrate import calibrate_weights
from qlip.methods.runner import (
    activations_bypassed,
    capture_unit,
    channel_error,
    execution_order,
    full_precision,
    sample_rows,
    weight_quantizers_replaced,
)
from qlip.nn import QuantConfig, QuantLayer
from qlip.pipeline import prepare_unet
from qlip.quant.adaround import AdaRoundQuantizer, annealed_beta
from qlip.testing import build_sd14_unet

SINGLED_OUT = ("down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0",
               "down_blocks.1.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0")


DEVICE = "cuda"


def random_calibration(rows: int) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randn(rows, 4, 64, 64, generator=g),
                          torch.randint(0, 1000, (rows,), generator=g).float(),
                          torch.randn(rows, 77, 768, generator=g),
                          torch.zeros(rows, dtype=torch.long))


def time_unit(unet, units, module, layers, data, rows, config, warmup: int, iters: int) -> list:
    """Milliseconds per AdaRound iteration (forward, loss, backward, Adam step) of one unit."""
    inputs = capture_unit(unet, units, module, data, rows, config, want_output=False)
    with full_precision(units):
        targets = capture_unit(unet, units, module, data, rows, config, True).to(inputs.device)
    rounders = {n: [AdaRoundQuantizer(q, w) for q, w in zip(lay.weight_quantizers, lay.weight_slices())]
                for n, lay in layers.items()}
    alphas = [r.alpha for rs in rounders.values() for r in rs]
    optimiser = torch.optim.Adam(alphas, lr=config.lr)
    times = []
    with ExitStack() as stack:
        for n, layer in layers.items():
            stack.enter_context(weight_quantizers_replaced(layer, rounders[n]))
        for it in range(warmup + iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            index = torch.randint(inputs.size, (config.batch_size,))
            args, kwargs = inputs.take(index)
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            loss = channel_error(out, targets[index.to(targets.device)].to(out))
            beta = annealed_beta(config.iters, config.iters)  # regulariser on, as after warm-up
            loss = loss + config.reg_weight * sum(r.regularizer(beta) for rs in rounders.values()
                                                  for r in rs)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            torch.cuda.synchronize()
            if it >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def sd14_units(dtype: torch.dtype, warmup: int, iters: int, default_iters: int) -> dict:
    torch.manual_seed(0)
    unet = build_sd14_unet(DEVICE, dtype)
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8))
    calibrate_weights(units, "minmax")  # the grid does not change the cost
    config = ReconstructionConfig(capture_batch=8)
    data = random_calibration(8)
    rows = sample_rows(len(data), 8, 0)
    layers = {n: u for n, u in units.items() if isinstance(u, QuantLayer)}
    per_unit = {}
    with activations_bypassed(units):
        for name, module in execution_order(unet, units, data):
            inner = {n: layer for n, layer in layers.items()
                     if n == name or n.startswith(name + ".")}
            times = time_unit(unet, units, module, inner, data, rows, config, warmup, iters)
            per_unit[name] = {"median_ms": statistics.median(times), "kind": type(module).__name__}
            print(f"{name}: {per_unit[name]['median_ms']:.2f} ms/iter", flush=True)
    total_ms = sum(u["median_ms"] for u in per_unit.values())
    return {
        "dtype": str(dtype), "batch_size": config.batch_size, "timed_iterations": iters,
        "singled_out": {n: per_unit[n] for n in SINGLED_OUT if n in per_unit},
        "units": per_unit, "units_count": len(per_unit),
        "sum_of_unit_iteration_ms": total_ms,
        f"projected_minutes_at_{default_iters}_iters": total_ms * default_iters / 60e3,
        "projected_minutes_at_20000_iters": total_ms * 20000 / 60e3,
    }


def _images(pipe, prompts: list[str], policy) -> torch.Tensor:
    from qlip.pipeline import GenerationConfig, generate

    config = GenerationConfig(steps=25, guidance=4.0, batch_size=len(prompts))
    result = generate(pipe, prompts, list(range(len(prompts))), policy, config, progress=False)
    return torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32)
                        for im in result.images]) / 127.5 - 1.0  # values in [-1, 1]


def reference_end_to_end(methods: list[str]) -> dict:
    """Q-Diffusion / PTQD W4A8 with the documented defaults on the reference model (timed end to
    end), and the mean squared difference between FP and quantized images of the same seeds."""
    from qlip.pipeline import QuantizeJob, quantize_pipeline
    from qlip.pipeline.ptqd_sampling import remove_ptqd
    from qlip.world.domain import training_prompts
    from qlip.world.reference import load_reference_pipeline

    prompts = [p.text for p in training_prompts(32, 0)]
    eval_prompts = [p.text for p in training_prompts(8, 123)]
    results = {}
    for method in methods:
        pipe = load_reference_pipeline(device=DEVICE)
        fp_images = _images(pipe, eval_prompts, None)
        ptqd = method == "ptqd"
        job = QuantizeJob(method=method, base_model="reference", quant=QuantConfig(
            wbits=4, abits=8, preset="ptqd" if ptqd else "qdiffusion",
            weight_per_channel=not ptqd))
        torch.cuda.synchronize()
        start = time.perf_counter()
        units = quantize_pipeline(pipe, prompts, job, f"/tmp/{method}_reference", progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        entry = {"seconds": seconds, "units": len(units),
                 "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
                 "config": job.method_config()}
        if ptqd:
            from qlip.methods.ptqd import CorrectionStats
            from qlip.pipeline import apply_ptqd
            from qlip.pipeline.saving import load_quantized

            info = load_quantized(load_reference_pipeline().unet, f"/tmp/{method}_reference")
            stats = CorrectionStats.from_extra(info.extra)
            entry["k_t"] = stats.k.tolist()
            entry["sigma_q"] = stats.sigma_q.tolist()
            apply_ptqd(pipe, stats)
            entry["image_mse_corrected_ddim25_interpolated"] = float(
                (_images(pipe, eval_prompts, None) - fp_images).pow(2).mean())
            remove_ptqd(pipe)
        entry["image_mse_vs_fp"] = float((_images(pipe, eval_prompts, None) - fp_images).pow(2)
                                         .mean())
        results[method] = entry
        print(method, json.dumps({k: v for k, v in entry.items() if k != "config"}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/reconstruction_speed.json")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-only", action="store_true",
                        help="only the end-to-end runs on the reference model")
    parser.add_argument("--methods", default="qdiffusion,ptqd")
    args = parser.parse_args()
    default_iters = ReconstructionConfig().iters
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for name in [] if args.reference_only else args.dtypes.split(","):
        result["runs"].append(sd14_units(getattr(torch, name), args.warmup, args.iters,
                                         default_iters))
        torch.cuda.empty_cache()
    if not args.skip_reference:
        result["reference_w4a8"] = reference_end_to_end(args.methods.split(","))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for run in result["runs"]:
        print(run["dtype"], json.dumps(run["singled_out"]), run["sum_of_unit_iteration_ms"])


if __name__ == "__main__":
    main()
