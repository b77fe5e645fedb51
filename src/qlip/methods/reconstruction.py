"""BRECQ reconstruction with AdaRound (Q-Diffusion's weight calibration).

The UNet is cut into reconstruction units, visited in execution order: blocks (diffusers
``ResnetBlock2D`` and ``BasicTransformerBlock``) and every quantized layer outside a block
(conv_in, conv_out, time embedding, down/upsamplers, proj_in/proj_out). For each unit the inputs
come from the already-quantized prefix and the targets from the full-precision model (both captured
by running the UNet with hooks and stopping at the unit, streamed to CPU); the rounding variables
of the unit's weights are trained to reproduce the targets, then frozen to integer codes.

Activations stay in full precision during weight reconstruction, as in Q-Diffusion. After each
unit its codes are written to ``checkpoint_dir``; a restarted run loads finished units and
continues with the next one, and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantLayer, QuantUnit, activations_bypassed
from ..quant import BYPASS_BITS
from ..quant.adaround import AdaRoundQuantizer, annealed_beta
from .calib_data import CalibrationSet

BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")


@dataclass(frozen=True)
class ReconstructionConfig:
    """BRECQ/AdaRound hyper-parameters; the paper's (Q-Diffusion's) values in the comments."""

    iters: int = 1000  # Q-Diffusion: 20,000 per block (too slow for our budget: docs/methods.md);
    # 0 = no reconstruction (round-to-nearest on the weight grid)
    batch_size: int = 8  # Q-Diffusion: 8
    lr: float = 1e-3  # Adam on the rounding variables only; Q-Diffusion: 1e-3
    reg_weight: float = 0.01  # rounding regulariser weight; Q-Diffusion: 0.01
    beta_start: float = 20.0  # β annealed from 20 ...
    beta_end: float = 2.0  # ... to 2
    warmup: float = 0.2  # fraction of iterations without regulariser; Q-Diffusion: 0.2
    num_samples: int = 256  # calibration rows used; Q-Diffusion: all 25 × 256 = 6,400
    capture_batch: int = 32  # rows per UNet pass while caching unit inputs/targets
    device_cache_mb: int = 2048  # keep a unit's cached inputs on the GPU when smaller than this
    seed: int = 0
    block_types: tuple[str, ...] = BLOCK_TYPES

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("reconstruction iters must be >= 0, batch_size and num_samples >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1); got {self.warmup}")


class _StopForward(Exception):
    """Raised by a capture hook: the rest of the UNet need not run."""


# -- model states ------------------------------------------------------------------------------
class _FullPrecisionWeight(nn.Module):
    ste = True  # QuantLayer then calls forward(w) instead of dequantizing its codes

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


@contextmanager
def weight_quantizers_replaced(layer: QuantLayer, replacements: list[nn.Module]) -> Iterator[None]:
    """Let ``replacements`` (one per input split) produce the layer's weight while inside."""
    original = list(layer.weight_quantizers)
    try:
        for i, module in enumerate(replacements):
            layer.weight_quantizers[i] = module
        layer.refresh_weight()
        yield
    finally:
        for i, module in enumerate(original):
            layer.weight_quantizers[i] = module
        layer.refresh_weight()


@contextmanager
def full_precision(units: dict[str, QuantUnit]) -> Iterator[None]:
    """The swapped UNet computes exactly as the FP model while inside (weights and activations)."""
    with ExitStack() as stack:
        stack.enter_context(activations_bypassed(units))
        for unit in units.values():
            if isinstance(unit, QuantLayer):
                replacements = [_FullPrecisionWeight() for _ in unit.weight_quantizers]
                stack.enter_context(weight_quantizers_replaced(unit, replacements))
        yield


# -- running calibration rows --------------------------------------------------------------------
def sample_rows(num_rows: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct row indices (all rows when fewer), sorted by index, reproducibly."""
    if count >= num_rows:
        return torch.arange(num_rows)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:count].sort().values


def run_rows(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet, rows: torch.Tensor,
    batch_size: int, shuffle_seed: int | None = None, mix_steps: bool = False,
) -> None:
    """Feed ``rows`` of ``data`` through the UNet in batches of one sampling step each, telling the
    units the step index (per-step tables); a capture hook may stop a pass early.

    ``shuffle_seed``: the rows (or, for one-step batches, the batches) go in a random order, so a
    running statistic does not end on the last sampling step. ``mix_steps``: batches mix rows of
    every step (only for models without per-step tables; the units are told step 0).
    """
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(shuffle_seed or 0)
    if mix_steps:
        if shuffle_seed is not None:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        batches = [(0, data.subset(rows[i : i + batch_size]))
                   for i in range(0, len(rows), batch_size)]
    else:
        batches = list(data.subset(rows).by_step(batch_size))
        if shuffle_seed is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    for step, batch in batches:
        for unit in units.values():
            unit.set_step(step)
        try:
            unet(batch.latents.to(device, dtype), batch.timesteps.to(device),
                 encoder_hidden_states=batch.text.to(device, dtype))
        except _StopForward:
            pass


def execution_order(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    block_types: tuple[str, ...] = BLOCK_TYPES,
) -> list[tuple[str, nn.Module]]:
    """The reconstruction units (blocks, and quantized layers outside blocks) in the order the
    UNet calls them, found by running one calibration row."""
    blocks = {n: m for n, m in unet.named_modules() if type(m).__name__ in block_types}
    candidates = dict(blocks)
    for name, unit in units.items():
        if isinstance(unit, QuantLayer) and not any(name.startswith(b + ".") for b in blocks):
            candidates[name] = unit
    order: list[str] = []

    def record(name: str) -> Callable:
        return lambda module, args: order.append(name) if name not in order else None

    handles = [m.register_forward_pre_hook(record(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad(), full_precision(units):
            run_rows(unet, units, data, torch.arange(1), 1)
    finally:
        for handle in handles:
            handle.remove()
    return [(name, candidates[name]) for name in order]


class CachedCalls:
    """The positional and keyword arguments of a module's calls, concatenated over batches along
    the batch dim (tensors whose first dim is the batch size; anything else is kept once)."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict, int]] = []

    def add(self, args: tuple, kwargs: dict, batch: int) -> None:
        def keep(v):
            return v.detach().cpu() if isinstance(v, torch.Tensor) else v

        self.calls.append((tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()},
                           batch))

    def _merge(self, values: list) -> object:
        first = values[0]
        batched = isinstance(first, torch.Tensor) and first.ndim > 0 and all(
            v.shape[0] == b for v, (_, _, b) in zip(values, self.calls))
        return torch.cat(values) if batched else first

    def finish(self, device: torch.device, device_cache_mb: int) -> CachedCalls:
        """Merge the batches; move them to ``device`` if they fit in ``device_cache_mb``."""
        args = [self._merge([c[0][i] for c in self.calls]) for i in range(len(self.calls[0][0]))]
        kwargs = {k: self._merge([c[1][k] for c in self.calls]) for k in self.calls[0][1]}
        self.size = sum(b for _, _, b in self.calls)
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.device = device if nbytes <= device_cache_mb * 2**20 else torch.device("cpu")
        self.target_device = device
        self.args = [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in args]
        self.kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                       for k, v in kwargs.items()}
        self.calls = []
        return self

    def _take(self, value, index: torch.Tensor):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == self.size:
            value = value[index.to(value.device)]
        return value.to(self.target_device) if isinstance(value, torch.Tensor) else value

    def take(self, index: torch.Tensor) -> tuple[list, dict]:
        """The arguments of rows ``index``, on the model's device."""
        return ([self._take(v, index) for v in self.args],
                {k: self._take(v, index) for k, v in self.kwargs.items()})


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("a reconstruction unit was called without any tensor argument")


@torch.no_grad()
def capture_unit(
    unet: nn.Module, units: dict[str, QuantUnit], module: nn.Module, data: CalibrationSet,
    rows: torch.Tensor, config: ReconstructionConfig, want_output: bool,
) -> CachedCalls | torch.Tensor:
    """The inputs of ``module`` (a :class:`CachedCalls`) or its outputs ``[N, ...]`` (on CPU) over
    ``rows``, in the model's current state; each UNet pass stops right after the module."""
    inputs, outputs = CachedCalls(), []

    def before(mod, args, kwargs):
        if not want_output:
            inputs.add(args, kwargs, _batch_size(args, kwargs))
            raise _StopForward

    def after(mod, args, kwargs, output):
        outputs.append(_first_tensor(output).detach().cpu())
        raise _StopForward

    pre = module.register_forward_pre_hook(before, with_kwargs=True)
    post = module.register_forward_hook(after, with_kwargs=True)
    try:
        run_rows(unet, units, data, rows, config.capture_batch)
    finally:
        pre.remove()
        post.remove()
    if want_output:
        return torch.cat(outputs)
    return inputs.finish(unet.device, config.device_cache_mb)


# -- training ------------------------------------------------------------------------------------
def channel_error(output: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``|output - target|^p`` summed over channels (dim 1 of [B, C, H, W] or [B, C]; the last dim
    of [B, N, C]) and averaged over everything else (Q-Diffusion's reconstruction loss)."""
    channel_dim = -1 if output.ndim == 3 else 1
    return (output - target).abs().pow(p).sum(channel_dim).mean()


def optimise_unit(
    module: nn.Module, params: list[nn.Parameter], inputs: CachedCalls, targets: torch.Tensor,
    iters: int, batch_size: int, lr: float, seed: int, p: float = 2.0,
    penalty: Callable[[int], torch.Tensor | None] | None = None, cosine: bool = False,
    desc: str = "", progress: bool = True,
) -> None:
    """Adam on ``params`` to make ``module(inputs)`` match ``targets`` (random batches of rows,
    reproducible from ``seed``); ``penalty(iteration)`` is added to the loss when not None."""
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iters) if cosine else None
    generator = torch.Generator().manual_seed(seed)
    device = inputs.target_device
    for iteration in tqdm(range(iters), desc=desc, leave=False, disable=not progress):
        index = torch.randint(inputs.size, (batch_size,), generator=generator)
        args, kwargs = inputs.take(index)
        output = _first_tensor(module(*args, **kwargs))
        loss = channel_error(output, targets[index.to(targets.device)].to(device, output.dtype), p)
        extra = penalty(iteration) if penalty is not None else None
        if extra is not None:
            loss = loss + extra
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()


def train_rounding(
    module: nn.Module, layers: dict[str, QuantLayer], inputs: CachedCalls, targets: torch.Tensor,
    config: ReconstructionConfig, seed: int, desc: str, progress: bool,
) -> dict[str, list[torch.Tensor]]:
    """AdaRound on every weight of ``layers`` (all inside ``module``); returns their codes."""
    rounders = {n: [AdaRoundQuantizer(q, w) for q, w in zip(layer.weight_quantizers,
                                                             layer.weight_slices())]
                for n, layer in layers.items()}
    every = [r for rs in rounders.values() for r in rs]

    def penalty(iteration: int) -> torch.Tensor | None:
        beta = annealed_beta(iteration, config.iters, config.warmup, config.beta_start,
                             config.beta_end)
        if beta is None:
            return None
        return config.reg_weight * sum(r.regularizer(beta) for r in every)

    with ExitStack() as stack:
        for name, layer in layers.items():
            stack.enter_context(weight_quantizers_replaced(layer, rounders[name]))
        optimise_unit(module, [r.alpha for r in every], inputs, targets, config.iters,
                      config.batch_size, config.lr, seed, penalty=penalty, desc=desc,
                      progress=progress)
    return {n: [r.codes() for r in rs] for n, rs in rounders.items()}


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_meta(config: ReconstructionConfig, layers: dict[str, QuantLayer]) -> str:
    return json.dumps({"config": asdict(config),
                       "layers": {n: layer.wbits for n, layer in sorted(layers.items())}})


def _save_checkpoint(path: Path, layers: dict[str, QuantLayer], meta: str) -> None:
    tensors = {}
    for name, layer in layers.items():
        for i, (codes, quantizer) in enumerate(zip(layer.weight_codes(), layer.weight_quantizers)):
            tensors[f"{name}.codes{i}"] = codes.contiguous().cpu()
            tensors[f"{name}.scale{i}"] = quantizer.scale.detach().contiguous().cpu()
            tensors[f"{name}.zero{i}"] = quantizer.zero_point.contiguous().cpu()
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"qlip-reconstruction": meta})
    os.replace(temporary, path)  # a crash mid-write never leaves a half checkpoint


def _load_checkpoint(path: Path, layers: dict[str, QuantLayer], meta: str) -> None:
    with safe_open(str(path), framework="pt") as file:
        if file.metadata().get("qlip-reconstruction") != meta:
            raise ValueError(
                f"{path} was written by a reconstruction with another config or model; delete "
                f"{path.parent} to start over, or resume with the same settings"
            )
        for name, layer in layers.items():
            codes = []
            for i, quantizer in enumerate(layer.weight_quantizers):
                with torch.no_grad():
                    quantizer.scale.copy_(file.get_tensor(f"{name}.scale{i}"))
                    quantizer.zero_point.copy_(file.get_tensor(f"{name}.zero{i}"))
                codes.append(file.get_tensor(f"{name}.codes{i}").to(quantizer.scale.device))
            layer.set_weight_codes(codes)


def _reconstruct_unit(
    unet: nn.Module, units: dict[str, QuantUnit], module: nn.Module, name: str,
    layers: dict[str, QuantLayer], data: CalibrationSet, rows: torch.Tensor,
    config: ReconstructionConfig, seed: int, progress: bool,
) -> None:
    """Capture the unit's inputs (quantized prefix) and targets (FP), train, freeze the codes."""
    inputs = capture_unit(unet, units, module, data, rows, config, want_output=False)
    with full_precision(units):
        targets = capture_unit(unet, units, module, data, rows, config, True)
    codes = train_rounding(module, layers, inputs, targets.to(inputs.device), config, seed, name,
                           progress)
    for layer_name, layer in layers.items():
        layer.set_weight_codes(codes[layer_name])


def reconstruct_weights(
    unet: nn.Module, units: dict[str, QuantUnit], data: CalibrationSet,
    config: ReconstructionConfig | None = None, checkpoint_dir: str | Path | None = None,
    progress: bool = True, on_unit_done: Callable[[str], None] | None = None,
) -> list[str]:
    """Block/layer reconstruction of every quantized weight (their grids must be set, e.g. by
    ``QuantLayer.calibrate_weight``). Returns the units reconstructed, in order.

    >>> reconstruct_weights(unet, units, data, ReconstructionConfig(iters=200))  # doctest: +SKIP
    """
    config = config or ReconstructionConfig()
    if config.iters == 0:
        return []
    layers = {n: u for n, u in units.items()
              if isinstance(u, QuantLayer) and u.wbits < BYPASS_BITS}
    meta = _checkpoint_meta(config, layers)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(len(data), config.num_samples, config.seed)
    done = []
    with activations_bypassed(units):
        order = execution_order(unet, units, data, config.block_types)
        bar = tqdm(order, desc="reconstruction", disable=not progress)
        for index, (name, module) in enumerate(bar):
            inner = {n: layer for n, layer in layers.items()
                     if n == name or n.startswith(name + ".")}
            if not inner:
                continue
            path = folder / f"{index:03d}-{name}.safetensors" if folder is not None else None
            if path is not None and path.is_file():
                _load_checkpoint(path, inner, meta)
            else:
                _reconstruct_unit(unet, units, module, name, inner, data, rows, config,
                                  config.seed + index, progress)
                if path is not None:
                    _save_checkpoint(path, inner, meta)
            done.append(name)
            if on_unit_done is not None:
                on_unit_done(name)
    return done
