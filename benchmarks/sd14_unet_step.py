"""One denoising step of a published UNet architecture (``--arch sd14``: Stable Diffusion 1.4,
64×64 latents, context 77×768; ``--arch sdxl``: SDXL base, 128×128 latents, context 77×2048 and
the added text/time conditioning), with random weights, bf16, ``--batch`` images (default 2, one
guidance pair), timed and with its peak GPU memory (``memory_mib``): bf16
(``bf16_channels_last``: the channels-last layout cuDNN prefers) against simulated W4A8 (layers
only; layers + attention, materialised or fused: ``w4a8_attention_fused`` runs softmax·V through
qlip.quant.fused_attention's Triton kernel; ``w4a8_layers_pytorch`` without the one-launch
quantizer; ``w4a8_layers_real`` with the Linear layers and convs in int8 math,
qlip.quant.real_gemm/real_conv; ``w4a8_layers_real_packed`` the same on packed 4-bit weights,
every layer's codes two a byte, unpacked in the kernels' registers (``real_gemm.UNPACK_PACKED``
off, as every ``_packed`` variant); ``w4a8_layers_real_persistent`` the int8 one with its Linear
layers and stride-1 3×3 convs always through the persistent TMA kernels,
``real_gemm.PERSISTENT = real_conv.PERSISTENT = True``, and ``w4a8_layers_real_one_tile`` never
(the default, None, takes them while a CUDA graph is captured);
``w4a8_layers_real_conv_one_tile`` the default for Linear layers, never for convs;
``w4a8_layers_real_fp8``
the int8 one with its Linear layers and 1×1 convs in e4m3 through ``torch._scaled_mm``,
qlip.quant.real_fp8, ``..._fp8_fast`` with its fast accumulation, ``..._fp8_fast_packed`` the
same on packed 4-bit weights, unpacked to e4m3 per call for the fp8 GEMMs by PyTorch ops that
Inductor compiles, ``..._fp8_fast_packed_unpack`` by one Triton launch a layer and call,
``real_gemm.UNPACK_PACKED`` (the library's default since the twenty-fourth session); ``w4a8_layers_real_packed_unpack`` the int8 packed one so, its
integer kernels reading the unpacked codes instead of unpacking every tile) and a W4A{8,16,32}
bank whose every unit's bits change at every call. Eager, CUDA-graph replay and
``torch.compile``. Run on the GPU:

    python benchmarks/sd14_unet_step.py --out benchmarks/results/sd14_unet_step.json
    python benchmarks/sd14_unet_step.py --arch sdxl --batch 8 --out ...

The variants run as parallel processes so that their compilations overlap; the measurements then
take turns, one variant at a time: eager in rotated rounds, then the rest (``--variant NAME`` runs
one; the parent merges their JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import (
    QuantConfig,
    pack_weights,
    quant_units,
    use_fused_attention,
    use_fused_quantize,
    use_real_execution,
)
from qlip.pipeline import prepare_unet
from qlip.pipeline.generate import StepController
from qlip.policies import BitPolicy, FixedBits
from qlip.quant import real_conv, real_fp8, real_gemm
from qlip.testing import build_unet, unet_step_inputs

VARIANTS = ("bf16", "bf16_channels_last", "w4a8_layers", "w4a8_layers_pytorch", "w4a8_layers_real",
            "w4a8_layers_real_packed", "w4a8_layers_real_persistent", "w4a8_layers_real_one_tile",
            "w4a8_layers_real_conv_one_tile", "w4a8_layers_real_fp8", "w4a8_layers_real_fp8_fast",
            "w4a8_layers_real_fp8_fast_packed", "w4a8_layers_real_fp8_fast_packed_unpack",
            "w4a8_layers_real_packed_unpack", "w4a8_attention", "w4a8_attention_fused", "bank")
COMPILED = ("bf16", "bf16_channels_last", "w4a8_layers", "w4a8_layers_real",
            "w4a8_layers_real_packed", "w4a8_layers_real_persistent", "w4a8_layers_real_one_tile",
            "w4a8_layers_real_conv_one_tile", "w4a8_layers_real_fp8", "w4a8_layers_real_fp8_fast",
            "w4a8_layers_real_fp8_fast_packed", "w4a8_layers_real_fp8_fast_packed_unpack",
            "w4a8_layers_real_packed_unpack", "w4a8_attention", "w4a8_attention_fused", "bank")
BANK = (8, 16, 32)


def error_text(err: Exception) -> str:
    """An error for the record: its type, its message's start and its end (Inductor's wrap a
    compile worker's traceback, whose cause comes last; the twentieth session's record of the
    fused attention's compile failure kept only the first 600 characters, not the cause)."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 3000 else f"{text[:600]} […] {text[-2400:]}"


class RandomBits(BitPolicy):
    """Every unit of every image at a random option of the bank, drawn anew on the device at every
    step (what a prompt-driven policy costs the step, at the worst: all bits change)."""

    def __init__(self, options, seed: int = 0):
        self.options = tuple(options)
        self.seed = seed

    def possible_bits(self):
        return set(self.options)

    def begin(self, batch, num_steps):
        self._shape = (len(batch), len(self.unit_names))
        self._table = torch.tensor(self.options, device=batch.device)
        self._generator = torch.Generator(batch.device).manual_seed(self.seed)

    def bits(self, step, timestep):
        pick = torch.randint(len(self.options), self._shape, device=self._table.device,
                             generator=self._generator)
        return self._table[pick]


class FrozenRandomBits(RandomBits):
    """One random assignment drawn as :class:`RandomBits` draws it, then the same at every call."""

    def begin(self, batch, num_steps):
        super().begin(batch, num_steps)
        self._frozen = super().bits(0, None)

    def bits(self, step, timestep):
        return self._frozen


class _Batch:  # what begin() reads of a prompt batch
    def __init__(self, size, device):
        self.size, self.device = size, torch.device(device)

    def __len__(self):
        return self.size


def inputs(unet, args, seed: int = 0):
    """One step's ``(x, t, context, kwargs)`` for ``--batch`` images on the GPU, bf16; the latents
    channels-last where :func:`build` made the UNet so."""
    x, t, c, kwargs = unet_step_inputs(unet, args.batch, "cuda", torch.bfloat16, seed)
    if getattr(unet, "qlip_bench_channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, t, c, kwargs


def timed(call, warmup: int, iters: int) -> dict:
    """CUDA-event time of ``call()`` (median/min ms) after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters,
            "times": times}


def channels_last(variant: str, args) -> bool:
    """Whether ``variant`` runs channels-last: ``bf16_channels_last``, and the real variants
    unless ``--real-channels-first`` (the real convs read and write NHWC; a channels-first model
    copies every conv's input to NHWC inside the kernel's operator: 2.5 ms of a 28.9 ms compiled
    step on an H100, the sixteenth session). The simulated variants with
    ``--sim-channels-last`` (fake quantization is elementwise or per channel, so the layout
    changes nothing but cuDNN's NCHW→NHWC copies)."""
    if variant == "bf16_channels_last":
        return True
    if variant.startswith("w4a8_layers_real"):
        return not getattr(args, "real_channels_first", False)
    return variant != "bf16" and getattr(args, "sim_channels_last", False)


def build(variant: str, args):
    unet = build_unet(args.arch, "cuda", torch.bfloat16)
    if channels_last(variant, args):  # before quantizing: a packed weight's placeholder is
        unet = unet.to(memory_format=torch.channels_last)  # not copied into a layout
    unet.qlip_bench_channels_last = channels_last(variant, args)  # (read by inputs())
    if variant in ("bf16", "bf16_channels_last"):
        return unet, {}
    options = BANK if variant == "bank" else (8,)
    config = QuantConfig(wbits=4, abits=8, abits_options=options,
                         quantize_attention=not variant.startswith("w4a8_layers"))
    units = prepare_unet(unet, config)
    x, t, c, kwargs = inputs(unet, args, seed=1)
    conditioning = {f"added_cond_kwargs.{k}": v
                    for k, v in kwargs.get("added_cond_kwargs", {}).items()}
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(len(x), dtype=torch.long),
                                             conditioning), progress=False)
    # softmax·V without the probability tensor (Triton) for the fused variant; the others
    # materialise it (since the twenty-first session a unit fuses on CUDA by default)
    use_fused_attention(unet, variant == "w4a8_attention_fused")
    if variant == "w4a8_layers_pytorch":  # the quantizers in PyTorch ops, not one launch each
        use_fused_quantize(unet, False)
    if variant.startswith("w4a8_layers_real"):  # the Linear layers in int8 math (real_gemm)
        if variant.endswith(("_packed", "_packed_unpack")):  # on the packed codes themselves
            pack_weights(unet)
            # _unpack: each layer's bytes unpacked by one launch a call, for the unpacked kernels
            real_gemm.UNPACK_PACKED = variant.endswith("_unpack")
        if variant.endswith(("_persistent", "_one_tile")):  # (this variant's own process)
            # the Linear layers and stride-1 3×3 convs always through the persistent TMA
            # kernels, or never (_conv_one_tile: the convs never, the Linear layers by default)
            if not variant.endswith("_conv_one_tile"):
                real_gemm.PERSISTENT = variant.endswith("_persistent")
            real_conv.PERSISTENT = variant.endswith("_persistent")
        fp8 = "_fp8" in variant  # the A8 GEMMs in e4m3 (torch._scaled_mm), the 3×3 convs int8
        if "_fp8_fast" in variant:
            real_fp8.FAST_ACCUM = True
        use_real_execution(unet, True, fp8=fp8)
    return unet, quant_units(unet)


def ready(policy, units, unet):
    policy.bind({n: u.options for n, u in units.items() if u.dynamic})
    policy.begin(_Batch(1, unet.device), 1)


def controller(unet, units, policy):
    """The seam's step controller, driven by hand before each call of a compiled forward."""
    ready(policy, units, unet)
    ctrl = StepController(unet, policy, units, "max", 1, count_macs=False)
    ctrl.detach()  # no module hook: the benchmark calls it, as the pipeline's hook would
    return ctrl


def graph_replay(step, warmup: int, iters: int, before=None) -> dict:
    """Capture ``step`` in a CUDA graph and time its replays (``before()`` runs outside it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        step()

    def call():
        if before is not None:
            before()
        graph.replay()

    return timed(call, warmup, iters)


def measure(variant: str, args, save=lambda out: None) -> dict:
    """One variant's measurements; ``save(out)`` gets what is measured so far after each phase,
    so that a run cut by its time limit keeps the phases it finished."""
    if getattr(args, "codes_kernel", False):
        real_gemm.CODES_IN_GRAPH = False
    unet, units = build(variant, args)
    x, t, c, kw = inputs(unet, args)

    def step():
        return unet(x, t, encoder_hidden_states=c, **kw).sample

    # GPU memory (MiB, this variant's process): what the model and the step's inputs hold, then
    # the peak while its eager and its compiled steps are timed (weights plus activations)
    out: dict = {"memory_mib": {"model": torch.cuda.memory_allocated() / 2**20},
                 "channels_last": channels_last(variant, args),
                 "codes_in_graph": not getattr(args, "codes_kernel", False)}
    if variant == "w4a8_attention_fused":  # the same model materialised, for the difference
        with torch.no_grad():
            fused = step().float()
            use_fused_attention(unet, False)
            plain = step().float()
            use_fused_attention(unet, True)
        out["fused_vs_materialised"] = {"max_abs": float((fused - plain).abs().max()),
                                        "mean_abs": float((fused - plain).abs().mean()),
                                        "mean_abs_out": float(plain.abs().mean())}
    if variant == "w4a8_layers":  # one-launch quantizers against the PyTorch ops: equal?
        with torch.no_grad():
            one = step()
            use_fused_quantize(unet, False)
            ops = step()
            use_fused_quantize(unet, True)
        out["kernel_vs_pytorch"] = {"equal": bool(torch.equal(one, ops)),
                                    "max_abs": float((one.float() - ops.float()).abs().max())}
    if variant.startswith("w4a8_layers_real"):  # real Linear layers against the simulation
        start = time.perf_counter()
        with torch.no_grad():
            real = step().float()
        torch.cuda.synchronize()
        # the first real call compiles every kernel's tiles and times them on each layer shape
        # (Triton's autotune), before Inductor sees the model
        out["first_eager_s"] = time.perf_counter() - start
        save(out | {"partial": "first eager call only"})
        with torch.no_grad():
            out["real_linear_layers"] = use_real_execution(unet, False)
            simulated = step().float()
            use_real_execution(unet, True)
        out["real_vs_simulated"] = {"max_abs": float((real - simulated).abs().max()),
                                    "mean_abs": float((real - simulated).abs().mean()),
                                    "mean_abs_out": float(simulated.abs().mean())}
    compiled = None
    if variant in COMPILED and args.compile:
        compiled = torch.compile(unet.forward)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                compiled(x, t, encoder_hidden_states=c, **kw)
            torch.cuda.synchronize()
            out["first_compile_s"] = time.perf_counter() - start
            save(out | {"partial": "compiled, nothing timed"})
            if variant.startswith("w4a8_layers_real"):  # the real kernels stay in the graph
                with torch.no_grad():
                    got = compiled(x, t, encoder_hidden_states=c, **kw).sample.float()
                    want = step().float()
                out["compiled_vs_eager_real"] = {"max_abs": float((got - want).abs().max()),
                                                 "mean_abs": float((got - want).abs().mean())}
        except Exception as err:  # noqa: BLE001 (a variant that does not compile is a result)
            compiled, out["compile_error"] = None, error_text(err)
    _barrier(args)
    # Eager steps are bound by the host, whose speed drifts between minutes (bf16 eager read
    # 34 ms and 47 ms in two runs of the same code): the variants measure eager in rounds taking
    # turns in a rotated order, so that a ratio compares steps timed within seconds of each other.
    rounds, late = [], 0
    torch.cuda.reset_peak_memory_stats()
    for r in range(args.eager_rounds):
        with _Turn(args, r) as turn:
            rounds.append(timed(step, args.warmup if r == 0 else 2, args.iters))
        late += turn.late
    times = [t for one in rounds for t in one["times"]]
    out["eager"] = {"median_ms": statistics.median(times), "min_ms": min(times),
                    "iters": len(times), "round_medians_ms": [one["median_ms"] for one in rounds],
                    "times": times, "rounds_out_of_turn": late}
    out["memory_mib"]["eager_peak"] = torch.cuda.max_memory_allocated() / 2**20
    save(out | {"partial": "eager only"})
    # the rest in one more turn of the same order: nothing else runs while it is timed (run 4's
    # graph times, taken under a lock while other variants were still in their eager rounds,
    # read 36.6 ms for W4A8 layers against 17.9 ms alone)
    with _Turn(args, args.eager_rounds) as turn:
        out["rest_out_of_turn"] = turn.late
        out["graph"] = graph_replay(step, args.warmup, args.iters)
        save(out | {"partial": "eager and CUDA graph only"})
        if compiled is not None:
            torch.cuda.reset_peak_memory_stats()
            out["compiled"] = timed(lambda: compiled(x, t, encoder_hidden_states=c, **kw),
                                    args.warmup, args.iters)
            out["memory_mib"]["compiled_peak"] = torch.cuda.max_memory_allocated() / 2**20
        if variant == "bank" and compiled is not None:
            out.update(bits_changing(unet, units, compiled, (x, t, c, kw), args))
        if compiled is not None:  # last: a failed capture cannot spoil the rest
            # the compiled step's GPU work alone, its kernels replayed from a CUDA graph (the
            # compiled call above is launch-bound on a slow host)
            try:
                out["compiled_graph"] = graph_replay(
                    lambda: compiled(x, t, encoder_hidden_states=c, **kw), args.warmup, args.iters)
            except RuntimeError as err:  # a capture the compiled code does not allow
                out["compiled_graph_error"] = str(err)[:400]
    return out


def bits_changing(unet, units, compiled, inputs_, args) -> dict:
    """The bank model at fixed bits against every unit's bits changing at every call.

    Fixed assignments: all units at 8, 16 or 32 bits, and one random assignment drawn like the
    changing one but frozen (the same mix of bit-widths, never changing: what separates the cost of
    *changing* bits from that of *which* bits run). The variants are timed in interleaved rounds so
    that clock or thermal drift during the measurement falls on all of them alike."""
    x, t, c, kw = inputs_

    def with_controller(ctrl, fn):
        def call():
            ctrl(unet, (x, t), {})
            return fn(x, t, encoder_hidden_states=c, **kw)
        return call

    policies = {f"compiled_fixed_controller{'' if b == 8 else f'_a{b}'}": FixedBits(b) for b in BANK}
    policies["compiled_fixed_random_assignment"] = FrozenRandomBits(BANK)
    policies["compiled_bits_changing"] = RandomBits(BANK)
    # one controller (one bound table, as in a real run); the rounds swap its policy
    ctrl = controller(unet, units, policies["compiled_bits_changing"])
    for policy in policies.values():
        ready(policy, units, unet)

    def with_policy(policy):
        call = with_controller(ctrl, compiled)

        def run():
            ctrl.policy = policy
            return call()
        return run

    calls = {key: with_policy(policy) for key, policy in policies.items()}
    out: dict = {}
    recompiled = False
    with torch.no_grad():  # a new binding may compile once; then no value may recompile
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(args.rounds):
                for key, call in calls.items():
                    times[key] += timed(call, 2, args.iters)["times"]
    except RuntimeError as err:  # the stance raises on a recompile
        recompiled, out["recompile_error"] = True, error_text(err)
    for key, values in times.items():
        if values:
            out[key] = {"median_ms": statistics.median(values), "min_ms": min(values),
                        "iters": len(values), "rounds": args.rounds}
    out["recompiled_when_bits_change"] = recompiled
    ctrl.policy = policies["compiled_bits_changing"]
    changing = ctrl
    out["graph_bits_changing"] = graph_replay(
        lambda: unet(x, t, encoder_hidden_states=c, **kw), args.warmup, args.iters,
        before=lambda: changing(unet, (x, t), {}))
    out["controller_only_changing"] = timed(lambda: changing(unet, (x, t), {}), args.warmup,
                                            args.iters)
    # the compiled step computes what the eager model computes at the same bits
    with torch.no_grad():
        changing(unet, (x, t), {})
        eager = unet(x, t, encoder_hidden_states=c, **kw).sample.float()
        got = compiled(x, t, encoder_hidden_states=c, **kw).sample.float()
    out["compiled_vs_eager_max_abs_diff"] = float((got - eager).abs().max())
    out["output_abs_mean"] = float(eager.abs().mean())
    ctrl.close()
    counters = torch._dynamo.utils.counters
    out["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    out["dynamo_graph_breaks"] = int(sum(counters["graph_break"].values()))
    return out


def _barrier(args) -> None:
    """Wait until every variant process has compiled (or the deadline passed)."""
    if not args.sync_dir:
        return
    folder = Path(args.sync_dir)
    (folder / f"ready-{args.variant}").touch()
    deadline = time.time() + args.barrier_s
    while len(list(folder.glob("ready-*"))) < args.processes and time.time() < deadline:
        time.sleep(1)


class _Turn:
    """Round ``r`` of the eager measurement: variant ``index`` of ``processes`` waits until the
    shared counter reaches its place in the round's order (rotated by one each round), measures,
    then passes the counter on. A turn whose variant has not compiled yet (no ready marker) is
    skipped, not waited for: a slow compile (the real kernels' autotuning held every variant for
    minutes on an H100) does not stop the others. The skipped variant then measures when it is
    ready, out of turn (``late`` is True: other variants may be measuring beside it). A variant
    that is gone (crashed) stops the wait after ``--barrier-s``."""

    def __init__(self, args, r: int):
        self.path = Path(args.sync_dir) / "turn" if args.sync_dir else None
        self.args = args
        self.place = r * args.processes + (args.index + r) % args.processes
        self.late = False

    def _read(self) -> int:
        try:
            return int(self.path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _advance(self, value: int) -> None:
        tmp = self.path.with_suffix(f".{self.args.index}")
        tmp.write_text(str(max(self._read(), value)))
        os.replace(tmp, self.path)

    def _variant_at(self, count: int) -> str:
        """The variant whose turn the counter's value ``count`` is."""
        r, slot = divmod(count, self.args.processes)
        return self.args.variants.split(",")[(slot - r) % self.args.processes]

    def __enter__(self):
        if self.path is None:
            return self
        deadline = time.time() + self.args.barrier_s
        self.late = self._read() > self.place
        while (count := self._read()) < self.place and time.time() < deadline:
            if not (self.path.parent / f"ready-{self._variant_at(count)}").exists():
                self._advance(count + 1)  # still compiling: its turn is skipped
                continue
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self._advance(self.place + 1)


def ratio_interval(times: list | None, base_times: list | None, resamples: int = 2000,
                   seed: int = 0) -> list[float] | None:
    """A 95% percentile-bootstrap interval of median(times) / median(base_times), the two
    variants' timed calls resampled independently (scipy.stats.bootstrap); None without both
    samples (records older than the per-call times)."""
    if not times or not base_times or len(times) < 2 or len(base_times) < 2:
        return None
    from scipy.stats import bootstrap

    def ratio(a, b, axis=-1):
        return np.median(a, axis=axis) / np.median(b, axis=axis)

    result = bootstrap((np.asarray(times), np.asarray(base_times)), ratio, n_resamples=resamples,
                       paired=False, vectorized=True, method="percentile",
                       rng=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def summarise(results: dict) -> None:
    """``results["targets"]``: each variant's ratios to bf16 (``bf16``, else
    ``bf16_channels_last``, in the same mode) and to the best bf16 of any layout and mode, and its
    peak memory against bf16's; printed with a table of the median times."""
    v = results["variants"]
    base_name = next((n for n in ("bf16", "bf16_channels_last") if n in v), None)
    if base_name is None:
        raise KeyError("bf16 or bf16_channels_last")
    base = v[base_name]
    base_eager = base.get("eager", {}).get("median_ms")  # absent from a part cut before timing
    base_compiled = base.get("compiled", {}).get("median_ms")
    rows = []
    for name, data in v.items():
        for mode in ("eager", "graph", "compiled", "compiled_graph", "compiled_fixed_controller",
                     "compiled_fixed_controller_a16", "compiled_fixed_controller_a32",
                     "compiled_fixed_random_assignment", "compiled_bits_changing",
                     "graph_bits_changing", "controller_only_changing"):
            if mode in data:
                rows.append((name, mode, data[mode]["median_ms"]))
    targets = {}
    layers = v.get("w4a8_layers", {})
    if base_compiled and "compiled" in layers:
        targets["compiled_w4a8_layers_vs_bf16"] = layers["compiled"]["median_ms"] / base_compiled
    base_graph = base.get("compiled_graph", {}).get("median_ms")
    intervals = {}  # each compiled_graph ratio's 95% bootstrap interval over the timed replays
    for name in (n for n in COMPILED if not n.startswith("bf16")):
        # by the compiled step's GPU time (bank: A8, attention quantized)
        if base_graph and "compiled_graph" in v.get(name, {}):
            key = f"compiled_graph_{name}_vs_bf16"
            targets[key] = v[name]["compiled_graph"]["median_ms"] / base_graph
            interval = ratio_interval(v[name]["compiled_graph"].get("times"),
                                      base["compiled_graph"].get("times"))
            if interval:
                intervals[key] = interval
    if intervals:
        targets["intervals_95"] = intervals
    # the best bf16 (the baseline): the fastest of every bf16 layout and mode
    best = min(((data[mode]["median_ms"], f"{name} {mode}") for name, data in v.items()
                if name.startswith("bf16") for mode in ("eager", "graph", "compiled",
                                                        "compiled_graph") if mode in data),
               default=None)
    if best:
        targets["best_bf16"] = {"median_ms": best[0], "what": best[1]}
        for name, data in v.items():
            fastest = min((data[m]["median_ms"] for m in ("graph", "compiled_graph") if m in data),
                          default=None)
            if fastest and not name.startswith("bf16"):
                targets[f"fastest_{name}_vs_best_bf16"] = fastest / best[0]
    # peak GPU memory of each variant's eager and compiled step against the bf16 baseline's
    for name, data in v.items():
        for phase in ("eager_peak", "compiled_peak"):
            mine, theirs = (d.get("memory_mib", {}).get(phase) for d in (data, base))
            if mine and theirs and name != base_name:
                targets[f"{phase}_memory_{name}_vs_bf16"] = mine / theirs
    targets["bf16_baseline"] = base_name
    if base_eager and "eager" in layers:
        targets["eager_w4a8_layers_vs_bf16"] = layers["eager"]["median_ms"] / base_eager
    # the same without the one-launch quantizer
    if base_eager and "eager" in v.get("w4a8_layers_pytorch", {}):
        targets["eager_w4a8_layers_pytorch_vs_bf16"] = (
            v["w4a8_layers_pytorch"]["eager"]["median_ms"] / base_eager)
    bank = v.get("bank", {})
    if "compiled_bits_changing" in bank:
        targets["bits_changing_vs_fixed_compiled"] = (
            bank["compiled_bits_changing"]["median_ms"] / bank["compiled"]["median_ms"])
        fixed = [bank[k]["median_ms"] for k in bank if k.startswith("compiled_fixed_controller")]
        targets["bits_changing_vs_fixed_with_controller"] = (
            bank["compiled_bits_changing"]["median_ms"]
            / bank["compiled_fixed_controller"]["median_ms"])
        targets["bits_changing_vs_mean_of_fixed_8_16_32"] = (
            bank["compiled_bits_changing"]["median_ms"] / statistics.mean(fixed))
        if "compiled_fixed_random_assignment" in bank:  # the same mix of bits, not changing
            targets["bits_changing_vs_same_mix_fixed"] = (
                bank["compiled_bits_changing"]["median_ms"]
                / bank["compiled_fixed_random_assignment"]["median_ms"])
    # variants that measured beside others (still compiling when their turn came): their times
    # and ratios are not quiet ones (the eighteenth session's first real step on a fresh H100
    # read 51.9 ms out of turn, 25.2 ms in a quiet rerun on the warm machine)
    late = {}
    for name, data in v.items():
        whats = [what for what, flag in (("eager", data.get("eager", {}).get("rounds_out_of_turn")),
                                         ("graph and compiled", data.get("rest_out_of_turn")))
                 if flag]
        if whats:
            late[name] = whats
    if late:
        targets["timed_out_of_turn"] = late
    results["targets"] = targets
    width = max([len(name) + 2 for name, _, _ in rows] + [16])  # (names longer than 16
    # characters ran into the mode column until the nineteenth session)
    print(f"{'variant':<{width}}{'mode':<34}{'median ms':>10}")
    for name, mode, ms in rows:
        print(f"{name:<{width}}{mode:<34}{ms:>10.2f}")
    print(json.dumps(targets, indent=2))
    for name, whats in late.items():
        print(f"WARNING: {name} was timed out of turn ({', '.join(whats)}), beside other "
              "variants: do not report its times or ratios; rerun with warm caches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/sd14_unet_step.json")
    parser.add_argument("--arch", choices=("sd14", "sdxl"), default="sd14",
                        help="the UNet architecture (published config, random weights)")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the fixed/changing-bits comparison")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant (internal)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sync-dir", default="")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--index", type=int, default=0, help="this variant's place (internal)")
    parser.add_argument("--eager-rounds", type=int, default=5,
                        help="eager rounds, variants taking turns (iters steps each)")
    parser.add_argument("--barrier-s", type=float, default=420.0)
    parser.add_argument("--codes-kernel", action="store_true",
                        help="compiled real variants round their codes in the codes kernel "
                        "inside the operator, as before the sixteenth session, not in PyTorch ops "
                        "that Inductor fuses into the producer (real_gemm.CODES_IN_GRAPH)")
    parser.add_argument("--real-channels-first", action="store_true",
                        help="run the real variants channels-first (as before the sixteenth "
                        "session), not channels-last")
    parser.add_argument("--sim-channels-last", action="store_true",
                        help="run the simulated quantized variants channels-last too, as the "
                        "best bf16 (by default they run channels-first, as until the "
                        "twenty-first session)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager and CUDA-graph variants only (minutes less)")
    parser.add_argument("--summarise", metavar="PARTS", default="",
                        help="no GPU: the summary (ratios, their intervals) of a run's parts "
                             "folder OUT.parts, e.g. of a run cut by its time limit after its "
                             "variants were timed; written to --out")
    args = parser.parse_args()
    if args.summarise:
        parts = Path(args.summarise)
        if not parts.is_dir():
            parser.error(f"--summarise {parts}: no such folder (a run's OUT.parts)")
        results = {"arch": args.arch, "batch": args.batch, "from_parts": str(parts),
                   "variants": {f.stem: json.loads(f.read_text())
                                for f in sorted(parts.glob("*.json"))}}
        summarise(results)
        Path(args.out).write_text(json.dumps(results, indent=2))
        return
    if args.variant:
        def save(out: dict) -> None:  # whole or absent: a variant stopped mid-write tears nothing
            part = Path(args.out)
            part.with_suffix(".tmp").write_text(json.dumps(out, indent=2))
            os.replace(part.with_suffix(".tmp"), part)

        save(measure(args.variant, args, save))
        return
    names = args.variants.split(",")
    # the variants' own files beside --out (not in a temporary folder): a run cut by its time
    # limit leaves each variant's finished phases there (OUT.parts/<variant>.json, "partial")
    sync = Path(args.out).with_name(Path(args.out).stem + ".parts")
    shutil.rmtree(sync, ignore_errors=True)
    sync.mkdir(parents=True)
    procs = {}
    for index, name in enumerate(names):
        part = sync / f"{name}.json"
        cmd = [sys.executable, __file__, "--variant", name, "--out", str(part), "--sync-dir", str(sync),
               "--processes", str(len(names)), "--index", str(index),
               "--variants", args.variants, "--barrier-s", str(args.barrier_s),
               "--eager-rounds", str(args.eager_rounds), "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--rounds", str(args.rounds), "--arch", args.arch,
               "--batch", str(args.batch)] + ([] if args.compile else ["--no-compile"]) + (
               ["--real-channels-first"] if args.real_channels_first else []) + (
               ["--sim-channels-last"] if args.sim_channels_last else []) + (
               ["--codes-kernel"] if args.codes_kernel else [])
        procs[name] = (subprocess.Popen(cmd, env=os.environ.copy()), part)

    def stop(signum, frame):  # a time limit's SIGTERM: no variant may keep the GPU busy after it
        for proc, _ in procs.values():
            proc.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    from qlip.testing import UNET_CONFIGS

    config = UNET_CONFIGS[args.arch]
    size = config["sample_size"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    results = {"gpu": gpu, "torch": torch.__version__, "arch": args.arch,
               "batch": args.batch, "latent": [4, size, size],
               "context": [77, config["cross_attention_dim"]], "dtype": "bfloat16",
               "bank": list(BANK), "variants": {}}
    for name, (proc, part) in procs.items():
        code = proc.wait()
        done = json.loads(part.read_text()) if part.is_file() else {}
        # a variant that failed after some phases keeps them, marked "partial"
        results["variants"][name] = done if code == 0 else done | {"error": f"exit {code}"}
    Path(args.out).write_text(json.dumps(results, indent=2))
    try:
        summarise(results)
    except KeyError as err:  # a variant failed: its JSON above says how
        print(f"no summary: missing {err}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
