"""The generic runner under the calibration methods: the swapped UNet in full precision
(``full_precision``), calibration rows fed through it (``run_rows``), the reconstruction units in
execution order, the inputs or outputs of one unit captured over rows (``capture_unit``, each UNet
pass stopped right after the unit) and Adam on a unit's parameters against captured targets
(``optimise_unit``). BRECQ (``methods.brecq``) and Q-Diffusion's activation passes build on it.
Every UNet call goes through ``unet_inputs.call_unet``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantLayer, QuantUnit, activations_bypassed
from .calib_data import CalibrationSet
from .unet_inputs import call_unet

BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")


class CaptureSettings(Protocol):
    """How ``capture_unit`` batches and caches (``brecq.ReconstructionConfig`` is one)."""

    capture_batch: int  # rows per UNet pass while caching unit inputs/targets
    device_cache_mb: int  # keep the cached inputs on the model's device when smaller than this


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
            call_unet(unet, batch.inputs())
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
    rows: torch.Tensor, config: CaptureSettings, want_output: bool,
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
