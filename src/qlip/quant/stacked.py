"""Multi-bit fake quantizers: the parameters of every allowed bit-width are stacked tensors, so the
bit-width is data. Choosing bits is a gather, never a Python branch on tensor values, and never a
host sync: one compiled graph (or one captured CUDA graph) serves every bit assignment.

A *choice* tells the quantizer which option (slot) to apply:

- a 0-d long tensor: one slot for the whole tensor (the batch runs at one bit-width);
- a long tensor ``[n]``: one slot per image (``n`` images, laid out in the batch as a
  :class:`RowLayout` says);
- a float tensor ``[n, K]``: per image, probabilities over the ``K`` options (training). The
  forward value is that of the most probable option; gradients flow through the mixture
  ``Σ_k p_k · Q_k(x)`` (straight-through pattern of CADyQ, ALGORITHMS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import fused_quantize
from .bits import BYPASS_BITS, check_bits, is_bypass
from .log2 import log2_quant
from .ranges import affine_params, search_range
from .rounding import round_ste

LOOKUP_SIZE = BYPASS_BITS + 1  # bits 0..32 index the slot lookup


@dataclass(frozen=True)
class RowLayout:
    """How the ``n`` images of a choice sit in a tensor's leading (row) dim.

    Rows are ``[copies, n, heads]`` flattened: ``copies`` repeats of the image batch (the two
    classifier-free-guidance halves, diffusers' ``cat([uncond, cond])``), each row of an image
    split into ``heads`` rows by attention's ``head_to_batch_dim``.
    """

    images: int
    heads: int = 1

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [R, ...]`` -> ``[copies, n, heads, ...]`` (a view)."""
        per_copy = self.images * self.heads
        if x.shape[0] % per_copy:
            raise ValueError(
                f"a batch of {x.shape[0]} rows cannot hold {self.images} images × {self.heads} "
                "heads; per-image bits need the UNet batch to be whole copies of the image batch"
            )
        return x.unflatten(0, (x.shape[0] // per_copy, self.images, self.heads))

    @staticmethod
    def per_image(p: torch.Tensor, rest: int) -> torch.Tensor:
        """``p: [n, ...]`` -> broadcastable against a split tensor with ``rest`` trailing dims."""
        return p.reshape(1, p.shape[0], 1, *p.shape[1:], *([1] * (rest - p.ndim + 1)))


def slot_lookup(options: Sequence[int]) -> torch.Tensor:
    """``[33]`` long: the slot of each bit-width in ``options``; ``len(options)`` (out of range, so
    an index error, never a silent pick) for bit-widths the bank does not hold."""
    table = torch.full((LOOKUP_SIZE,), len(options), dtype=torch.long)
    for slot, bits in enumerate(options):
        table[bits] = slot
    return table


class StackedQuantizer(nn.Module):
    """Common part of the stacked quantizers: options, slot lookup, bypass mask, table rows."""

    num_steps: int | None = None  # rows of per-step tables (None: one row for every step)
    # eager inference on the GPU: the whole-batch per-tensor quantizer in one kernel launch
    # (qlip.quant.fused_quantize; the same values). False: the PyTorch path everywhere.
    kernel: bool = True

    def __init__(self, options: Sequence[int]):
        super().__init__()
        self.options = tuple(sorted({check_bits(b, "activation bits") for b in options}))
        if not self.options:
            raise ValueError("a multi-bit quantizer needs at least one bit-width option")
        self.has_bypass = is_bypass(self.options[-1])
        bits = torch.tensor([float(min(b, BYPASS_BITS)) for b in self.options])
        levels = torch.tensor([float(2**b - 1) if not is_bypass(b) else 1.0 for b in self.options])
        self.register_buffer("option_bits", bits, persistent=False)  # [K]
        self.register_buffer("levels", levels, persistent=False)  # [K] 2^b - 1
        self.register_buffer("bypass", torch.tensor([is_bypass(b) for b in self.options]),
                             persistent=False)  # [K]
        self.register_buffer("lookup", slot_lookup(self.options), persistent=False)  # [33]

    def slot(self, bits: int) -> int:
        """The option index of ``bits``; a ValueError saying how to get it otherwise."""
        if bits not in self.options:
            raise ValueError(
                f"activation bits {bits} not in this layer's bank {self.options}; quantize the "
                f"model with --abits-options including {bits}"
            )
        return self.options.index(bits)

    def calibrated_all(self) -> torch.Tensor | None:
        """0-d bool: every option (and step row) calibrated; None when nothing needs calibration."""
        return None

    def expected_bits(self, choice: torch.Tensor) -> torch.Tensor:
        """Bits of a choice: exact for slots, ``Σ_k p_k b_k`` for probabilities (32 for bypass)."""
        if choice.is_floating_point():
            return choice @ self.option_bits.to(choice.dtype)
        return self.option_bits[choice]

    # -- the kinds of choice ------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, choice: torch.Tensor, heads: int = 1,
        step: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x: [R, ...]``; ``choice`` as the module docstring says (a 0-d slot is one slot for the
        whole tensor); ``heads``: rows per image and copy (attention's batch×heads layout);
        ``step``: ``[1]`` long tensor, the row of per-step tables. Indices stay 1-d tensors: a
        0-d index would make dynamo specialise on its value."""
        if choice.ndim == 0:
            choice = choice.reshape(1)
        soft = choice.is_floating_point()
        if not soft:  # one launch where a kernel applies (eager GPU inference)
            fused = self._one_launch(x, choice, step, heads)
            if fused is not None:
                return fused
        if choice.shape[0] == 1 and not soft:  # the whole batch at one option: no split
            out = self._quantize(x, choice, step, split=False)
            if not self.has_bypass:
                return out
            # index_select, not [choice]: advanced indexing costs the host far more
            return torch.where(self._buffers["bypass"].index_select(0, choice), x, out)
        split = RowLayout(choice.shape[0], heads).split(x)  # [copies, n, heads, ...]
        out = self._soft(split, choice, step) if soft else self._hard(split, choice, step)
        return out.flatten(0, 2)

    def _one_launch(self, x: torch.Tensor, choice: torch.Tensor, step, heads: int = 1
                    ) -> torch.Tensor | None:
        """The quantizer (``[1]`` or per-image ``[n]`` slots) in one kernel launch, or None where
        that does not apply."""
        return None

    def _hard(self, split: torch.Tensor, choice: torch.Tensor, step) -> torch.Tensor:
        out = self._quantize(split, choice, step, split=True)
        if not self.has_bypass:
            return out
        bypass = self._buffers["bypass"].index_select(0, choice)
        return torch.where(RowLayout.per_image(bypass, split.ndim - 3), split, out)

    def _soft(self, split: torch.Tensor, probs: torch.Tensor, step) -> torch.Tensor:
        # probs: [n, K]; forward = the hard (argmax) choice, backward = Σ_k p_k Q_k(x)
        rest = split.ndim - 3
        soft = 0
        for k, bits in enumerate(self.options):
            q_k = split if is_bypass(bits) else self._quantize(split, k, step, split=True, ste=True)
            soft = soft + RowLayout.per_image(probs[:, k].to(split.dtype), rest) * q_k
        hard = self._hard(split, probs.detach().argmax(dim=1), step)
        return hard.detach() + (soft - soft.detach())

    def row_params(self, choice: torch.Tensor, heads: int, step: torch.Tensor | None,
                   row_max: torch.Tensor) -> torch.Tensor:
        """``[R, 4]`` per-row parameters of this quantizer for the fused attention kernel
        (:mod:`qlip.quant.fused_attention`), R = ``row_max``'s length, rows laid out as
        :class:`RowLayout` says; ``row_max [R]``: each row's largest value (a dynamic scale's
        input). ``choice``: ``[1]`` or ``[n]`` slots (soft choices train through the
        materialised path)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused-attention parameters")

    @staticmethod
    def _per_row(values: torch.Tensor, choice: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
        """``values [n, C]`` (n = len(choice)) -> ``[rows, C]`` in the batch×heads row layout."""
        if choice.shape[0] == 1:
            return values.expand(rows, values.shape[1])
        layout = RowLayout(choice.shape[0], heads)
        split = layout.split(torch.empty(rows, 0, device=values.device))  # checks the layout
        return values[None, :, None].expand(split.shape[0], -1, heads, -1).reshape(rows, -1)

    def _rows(self, choice, step) -> torch.Tensor | slice:
        """Rows (option k at step t: k·T + t) of the tables, for ``choice`` (int or ``[n]`` slots) at ``step``."""
        steps = self.num_steps
        if steps:
            if step is None:
                raise ValueError("this quantizer holds a per-step table: give the step index")
            return step + choice * steps
        return slice(choice, choice + 1) if isinstance(choice, int) else choice

    def _quantize(self, x, choice, step, split: bool, ste: bool = False) -> torch.Tensor:
        """Quantize ``x`` with option(s) ``choice`` (a Python int, or ``[n]`` slots, n = 1 for the
        whole tensor); ``split``: x is laid out ``[copies, n, heads, ...]``."""
        raise NotImplementedError


class StackedUniform(StackedQuantizer):
    """Uniform affine fake quantizer for each option, per tensor (or per channel group with
    ``channel_dim`` and ``group_index`` [C] -> group id), optionally with a table of parameters per
    sampling step (``num_steps`` rows, chosen by a step tensor).

    State (saved): ``scale`` and ``zero_point`` ``[K, T, P]`` (T = steps or 1, P = groups or 1)
    and ``calibrated`` ``[K, T]``. Derived (``refresh()``): ``table [K, T, 3, P]`` = (Δ, -z,
    2^b - 1 - z), so the forward is ``clamp(round(x/Δ), -z, 2^b-1-z)·Δ``, the same values as
    ``(clamp(round(x/Δ) + z, 0, 2^b - 1) - z)·Δ`` in four element-wise kernels.

    >>> q = StackedUniform((4, 8, 32))
    >>> q.slot_view(8).calibrate(torch.randn(1000))
    >>> q.slot_view(4).calibrate(torch.randn(1000))
    >>> y = q(torch.randn(3, 5), torch.tensor(1))  # 8 bits for the whole tensor
    """

    def __init__(
        self, options: Sequence[int], symmetric: bool = False, num_steps: int | None = None,
        channel_dim: int | None = None, group_index: torch.Tensor | None = None,
    ):
        super().__init__(options)
        self.symmetric = symmetric
        self.num_steps = num_steps
        self.channel_dim = channel_dim
        if group_index is not None and channel_dim is None:
            raise ValueError("group quantization needs channel_dim (the dim the groups split)")
        groups = int(group_index.max()) + 1 if group_index is not None else 1
        self.register_buffer("group_index", None if group_index is None else group_index.long())
        k, t = len(self.options), num_steps or 1
        # NaN until calibrated: an uncalibrated option gives NaN outputs, never plausible ones
        self.register_buffer("scale", torch.full((k, t, groups), float("nan")))
        self.register_buffer("zero_point", torch.zeros(k, t, groups))
        self.register_buffer("calibrated", torch.zeros(k, t, dtype=torch.bool))
        # rows: option k at step t is row k·T + t
        self.register_buffer("table", torch.zeros(k * t, 3, groups), persistent=False)
        self._cast: tuple | None = None  # (table, its version, the [K·T, 3] copy in x's dtype)
        for slot, bits in enumerate(self.options):
            if is_bypass(bits):
                self.scale[slot] = 1.0
                self.calibrated[slot] = True
        self.refresh()

    # -- calibration ----------------------------------------------------------------------------
    def set_range(self, slot: int, xmin: torch.Tensor, xmax: torch.Tensor,
                  step: int | None = None) -> None:
        """Store option ``slot``'s grid covering [xmin, xmax] ([P]) for one step row or all."""
        bits = self.options[slot]
        if is_bypass(bits):
            return
        scale, zero = affine_params(xmin.float(), xmax.float(), bits, self.symmetric)
        rows = slice(None) if step is None or not self.num_steps else slice(step, step + 1)
        with torch.no_grad():
            self.scale[slot, rows] = scale.to(self.scale)
            self.zero_point[slot, rows] = zero.to(self.zero_point)
            self.calibrated[slot, rows] = True
        self.refresh()

    def search_range(self, slot: int, x: torch.Tensor, method: str = "minmax",
                     percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
        return search_range(x, method, self.options[slot], self.symmetric, self.channel_dim,
                            self.group_index, self.scale.shape[-1], percentile)

    def slot_view(self, bits: int) -> UniformSlot:
        return UniformSlot(self, self.slot(bits))

    def calibrated_all(self) -> torch.Tensor:
        return self.calibrated.all()

    def check_calibrated(self) -> None:
        """Raise if an option (or a step row) was never calibrated. Reads the device: call it
        at load or before a run, never in a forward pass."""
        if not bool(self.calibrated.all()):
            missing = [b for b, ok in zip(self.options, self.calibrated.all(dim=1).tolist()) if not ok]
            rows = " (every sampling step of its table)" if self.num_steps else ""
            raise RuntimeError(
                f"the {missing}-bit activation quantizers were never calibrated{rows}; run a "
                "quantization method (e.g. qlip.methods.rtn) before using the model"
            )

    def refresh(self) -> None:
        """Rebuild the derived table from ``scale``/``zero_point`` (after calibration or load)."""
        with torch.no_grad():
            self.table.copy_(self._table())

    def _table(self) -> torch.Tensor:
        zero = self.zero_point.to(self.scale)
        top = self.levels.to(self.scale)[:, None, None] - zero
        return torch.stack([self.scale, -zero, top], dim=2).flatten(0, 1)  # [K·T, 3, P]

    # -- forward --------------------------------------------------------------------------------
    def _quantize(self, x, choice, step, split: bool, ste: bool = False) -> torch.Tensor:
        # Eager pays for every Python step here: buffers are read from _buffers, past
        # nn.Module.__getattr__. Training the step sizes (LSQ) needs the table as a function of
        # the live scale; gradients (to x, or to Δ while it is tuned) go straight through the
        # rounding.
        tuned = self._buffers["scale"].requires_grad
        ste = ste or (torch.is_grad_enabled() and (x.requires_grad or tuned))
        if self.channel_dim is None and not split and not ste:
            # per tensor, whole batch, inference: the shortest path
            rows = choice if not self.num_steps else self._rows(choice, step)
            scale, low, high = self._flat_table(x.dtype).index_select(0, rows).unbind(1)
            return torch.div(x, scale).round_().clamp_(low, high).mul_(scale)
        table = self._table() if tuned else self.table
        rows = self._rows(choice, step)
        params = (table[rows] if isinstance(rows, slice) else table.index_select(0, rows))
        params = params.to(x.dtype)  # [n, 3, P]
        scale, low, high = (self._broadcast(p, x, split) for p in params.unbind(1))
        q = x / scale
        q = round_ste(q) if ste else torch.round(q)
        return torch.clamp(q, low, high) * scale

    def _one_launch(self, x, choice, step, heads=1):
        # eager, inference, per tensor, on the GPU (a compiled graph fuses the PyTorch path)
        if (not self.kernel or self.channel_dim is not None or not fused_quantize.available(x)
                or torch.compiler.is_compiling()):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self._buffers["scale"].requires_grad):
            return None
        steps = self.num_steps or 0
        if steps and step is None:
            raise ValueError("this quantizer holds a per-step table: give the step index")
        bypass = self._buffers["bypass"] if self.has_bypass else None
        return fused_quantize.fake_quantize(x, self._flat_table(x.dtype), choice, step, steps,
                                            bypass, heads)

    def row_params(self, choice, heads, step, row_max):
        if self.channel_dim is not None or self.scale.shape[-1] != 1:
            raise NotImplementedError("the fused attention kernel takes per-tensor grids only")
        rows = choice if not self.num_steps else self._rows(choice, step)
        table = self._buffers["table"].index_select(0, rows)[:, :, 0].float()  # [n, 3]
        bypass = self._buffers["bypass"].index_select(0, choice).float()[:, None]
        return self._per_row(torch.cat([table, bypass], dim=1), choice, heads, row_max.shape[0])

    def _flat_table(self, dtype: torch.dtype) -> torch.Tensor:
        """``[K·T, 3]``: the per-tensor table in ``dtype``. Eager keeps the cast copy while the
        table is unchanged (its version counter), saving two operations per call; a compiled
        graph fuses the cast anyway."""
        table = self._buffers["table"]
        if torch.compiler.is_compiling() or table.is_inference():  # (no version counter)
            return table[:, :, 0].to(dtype)
        cached = self._cast
        if (cached is None or cached[0] is not table or cached[1] != table._version
                or cached[2].dtype != dtype):
            cached = (table, table._version, table[:, :, 0].to(dtype).contiguous())
            self._cast = cached
        return cached[2]

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor, split: bool) -> torch.Tensor:
        # p: [n, P]; x: [R, ...] (n = 1), or [copies, n, heads, ...] if split
        lead = 3 if split else 1
        if self.group_index is not None:
            p = p[:, self.group_index]  # groups -> channels
        core = [1] * (x.ndim - lead)
        if self.channel_dim is not None:
            dim = self.channel_dim % (x.ndim - lead + 1)  # in x's own dims (batch first)
            core[dim - 1] = -1
        else:
            p = p[:, 0]
        if split:
            return p.reshape(1, p.shape[0], 1, *core)
        return p.reshape(1, *core)

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_dim is None else (
            "group" if self.group_index is not None else "channel")
        steps = f", steps={self.num_steps}" if self.num_steps else ""
        return f"options={self.options}, symmetric={self.symmetric}, granularity={gran}{steps}"


class UniformSlot:
    """One option of a :class:`StackedUniform`, seen as a single-bit-width quantizer to calibrate."""

    def __init__(self, stack: StackedUniform, slot: int):
        self.stack, self.index = stack, slot
        self.bits = stack.options[slot]
        self.num_steps = stack.num_steps

    def set_range(self, xmin: torch.Tensor, xmax: torch.Tensor, step: int | None = None) -> None:
        self.stack.set_range(self.index, xmin, xmax, step)

    def search_range(self, x: torch.Tensor, method: str = "minmax", percentile: float = 99.99):
        return self.stack.search_range(self.index, x, method, percentile)

    def calibrate(self, x: torch.Tensor, method: str = "minmax", step: int | None = None,
                  percentile: float = 99.99) -> None:
        self.set_range(*self.search_range(x, method, percentile), step=step)

    @property
    def scale(self) -> torch.Tensor:
        """``[T, P]`` step sizes of this option (a view)."""
        return self.stack.scale[self.index]


class StackedLog2(StackedQuantizer):
    """Base-2 logarithmic fake quantizer per option (DGQ's attention probabilities) with dynamic
    scaling Δ = the max of the current tensor; with per-image choices, of each image's rows, so an
    image gets what it would alone. Needs no calibration."""

    def slot_view(self, bits: int):
        raise ValueError("log2 quantizers scale dynamically; there is nothing to calibrate")

    def check_calibrated(self) -> None:
        return None

    def refresh(self) -> None:
        return None

    def row_params(self, choice, heads, step, row_max):
        rows = row_max.shape[0]
        if choice.shape[0] == 1:  # Δ: the whole tensor's max
            delta = row_max.amax().reshape(1)
        else:  # each image's max, over its copies and heads
            split = RowLayout(choice.shape[0], heads).split(row_max)  # [copies, n, heads]
            delta = split.transpose(0, 1).flatten(1).amax(dim=1)
        delta = delta.float().clamp_min(1e-12)
        levels = self._buffers["levels"].index_select(0, choice).float()
        bypass = self._buffers["bypass"].index_select(0, choice).float()
        if delta.shape[0] != levels.shape[0]:
            delta = delta.expand(levels.shape[0])
        values = torch.stack([delta, levels, torch.zeros_like(levels), bypass], dim=1)  # [n, 4]
        return self._per_row(values, choice, heads, rows)

    def _quantize(self, x, choice, step, split: bool, ste: bool = False) -> torch.Tensor:
        ste = ste or (torch.is_grad_enabled() and x.requires_grad)
        levels = self.levels.to(x.dtype)
        # [n] (index_select: cheaper for the host than [choice]), or 0-d for a Python int
        levels = levels[choice] if isinstance(choice, int) else levels.index_select(0, choice)
        if not split:
            return log2_quant(x, x.detach().amax().clamp_min(1e-12), levels, ste=ste)
        # x: [copies, n, heads, ...]: one Δ per image, over its copies and heads
        rest = x.ndim - 3
        delta = x.detach().transpose(0, 1).flatten(1).amax(dim=1).clamp_min(1e-12)  # [n]
        if levels.ndim:
            levels = RowLayout.per_image(levels, rest)
        return log2_quant(x, RowLayout.per_image(delta, rest), levels, ste=ste)
