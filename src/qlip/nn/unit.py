"""The one interface every quantized unit shares (Linear, Conv2d, attention processor, and later
DGQ's grouped quantizers): setting bits and steps, listing banks, refreshing derived state and
counting cost. Nothing outside a unit asks ``hasattr`` or branches on the unit's type."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..quant import BYPASS_BITS, check_bits, is_bypass
from .bank import ActivationBank

_NO_ABITS = ("a unit's activation bits are data: set them with unit.set_bits(bits) (an int, a "
             "per-image tensor or probabilities); read unit.active_bits() or unit.default_bits")


class QuantUnit(nn.Module):
    """Base of the quantized units.

    **Bits are data.** ``set_bits(bits)`` takes

    - an ``int``: the whole batch at that bit-width;
    - a long tensor ``[n]`` of bit-widths: image ``i`` of the ``n`` images at ``bits[i]`` (both
      classifier-free-guidance halves of an image share them; attention's batch×heads rows too);
    - a float tensor ``[n, K]``: per image, probabilities over the bank's ``K`` options
      (``unit.options``) for training: forward at the most probable option, gradients through
      the mixture (see :mod:`qlip.quant.stacked`); ``expected_bits()`` gives ``Σ_k p_k b_k``.

    The unit stores option indices (slots), so a forward pass is gathers only: no host sync, no
    branch on values; changing the values between calls never recompiles. The seam writes every
    unit's choice of a step into one shared table (``bind_bits``), a single copy per step.

    >>> unit.set_bits(8)                                   # doctest: +SKIP
    >>> unit.set_bits(torch.tensor([4, 8]))                # two images, 4 and 8 bits
    >>> unit.set_bits(torch.tensor([[0.2, 0.8]]))          # soft: one image, over (4, 8)
    """

    kind: str
    fab_member: bool = False  # counted in FAB (the quantized Linear/Conv layers)

    def __init__(self, options: tuple[int, ...], default_bits: int, dynamic: bool):
        super().__init__()
        self.options = tuple(options)
        self.default_bits = check_bits(default_bits, "activation bits")
        if self.default_bits not in self.options:
            raise ValueError(f"abits {default_bits} is not among the bank options {self.options}")
        self.dynamic = dynamic  # False: bits fixed by a layer rule, bit policies leave it alone
        slot = self.options.index(self.default_bits)
        # [1]: one slot for the whole batch (a 1-d index: no reshape per call, no specialising)
        self.register_buffer("_choice", torch.tensor([slot]), persistent=False)
        self.register_buffer("_step", torch.zeros(1, dtype=torch.long), persistent=False)
        self._table: torch.Tensor | None = None  # shared choices of many units (bind_bits)
        self._row = 0
        self._shared_step: torch.Tensor | None = None

    # -- what a unit has ------------------------------------------------------------------------
    def activation_banks(self) -> dict[str, ActivationBank]:
        """Every activation bank, by part name (``in0``, ``in1``; ``q``, ``k``, ``v``, ``probs``)."""
        raise NotImplementedError

    def dynamic_banks(self) -> list[ActivationBank]:
        """The banks that follow ``set_bits`` (the softmax bank keeps its own bits)."""
        return list(self.activation_banks().values())

    def calibrate_weight(self, method: str = "minmax") -> None:
        """Set the weight grid (units without weights have none)."""

    def use_fused(self, on: bool | None = True) -> bool:
        """Use (or stop using) a fused kernel for this unit's computation (``None``: where its
        kernel runs); False for a unit without one."""
        return False

    def pack_weights(self) -> bool:
        """Keep the weights as packed integer codes only (see ``QuantLayer.pack_weights``);
        False for a unit with nothing to pack."""
        return False

    def refresh(self) -> None:
        """Rebuild derived state (quantizer tables, cached weights) after calibration or load."""
        for bank in self.activation_banks().values():
            bank.stack.refresh()

    def check_calibrated(self) -> None:
        """Raise if any quantizer of this unit was never calibrated (one read of the device)."""
        verify_calibrated({type(self).__name__: self})

    def operand_bits(self, site: str, abits: int) -> tuple[int, int]:
        """The two operand bit-widths of one of this unit's matmul sites at activation bits
        ``abits`` (32 = full precision)."""
        raise NotImplementedError

    # -- bits -----------------------------------------------------------------------------------
    @property
    def abits(self):
        raise AttributeError(_NO_ABITS)

    @abits.setter
    def abits(self, value):
        raise AttributeError(_NO_ABITS)

    def set_bits(self, bits: int | torch.Tensor) -> None:
        """Set the activation bits: int, per-image long tensor ``[n]`` or probabilities ``[n, K]``."""
        self._table = None
        if isinstance(bits, torch.Tensor) and bits.is_floating_point():
            if bits.ndim != 2 or bits.shape[1] != len(self.options):
                raise ValueError(f"soft bits must be [images, {len(self.options)}] probabilities "
                                 f"over {self.options}; got shape {tuple(bits.shape)}")
            choice = bits.to(self._choice.device)
        elif isinstance(bits, torch.Tensor):
            if bits.ndim != 1:
                raise ValueError(f"per-image bits must be a 1-d tensor; got shape {tuple(bits.shape)}")
            if bits.device.type == "cpu":  # checking CPU values costs no device sync
                self._check_values(bits)
            lookup = self.slot_lookup()
            choice = lookup[bits.to(lookup.device).long()]
        else:
            slot = self.slot_of(bits)
            if self._choice.shape == (1,) and not self._choice.is_floating_point():
                self._choice.fill_(slot)  # no host-to-device copy
                return
            choice = torch.full((1,), slot, dtype=torch.long, device=self._choice.device)
        self._put_choice(choice)

    def bind_bits(self, table: torch.Tensor | None, row: int = 0) -> None:
        """Read this unit's choice from ``table[row]`` at every call (slots or probabilities, as
        ``set_bits`` stores them); whoever owns ``table`` updates it in place. ``None``: back to
        the unit's own choice."""
        self._table, self._row = table, row

    def slot_lookup(self) -> torch.Tensor:
        """``[33]`` long: the slot of every bit-width (out of range for those not in the bank)."""
        return self.dynamic_banks()[0].stack.lookup

    def slot_of(self, bits: int) -> int:
        return self.dynamic_banks()[0].stack.slot(check_bits(bits, "activation bits"))

    def choice(self) -> torch.Tensor:
        """The active choice: ``[1]`` slot (the whole batch), ``[n]`` slots or ``[n, K]``
        probabilities."""
        return self._choice if self._table is None else self._table[self._row]

    def images(self) -> int:
        """How many images the active choice covers (1: the whole batch at one choice)."""
        choice = self.choice()
        return choice.shape[0] if choice.ndim else 1

    def active_bits(self) -> torch.Tensor:
        """The bits of the active choice (expected bits for soft choices): ``[1]`` or ``[n]``."""
        return self.dynamic_banks()[0].stack.expected_bits(self.choice())

    expected_bits = active_bits

    def _check_values(self, bits: torch.Tensor) -> None:
        bad = sorted(set(bits.tolist()) - set(self.options))
        if bad:
            raise ValueError(f"activation bits {bad} not in this layer's bank {self.options}; "
                             "quantize the model with --abits-options including them")

    def _put_choice(self, choice: torch.Tensor) -> None:
        current = self._choice
        same = (current.shape == choice.shape and current.dtype == choice.dtype
                and current.device == choice.device)
        if same:  # in place: a captured CUDA graph keeps reading the same memory
            current.copy_(choice)
        else:
            self._choice = choice.to(current.device)

    # -- steps ----------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """The sampling step (its index): the row of per-step tables, and what observers record."""
        self._shared_step = None
        for bank in self.activation_banks().values():
            bank.step = step
        if self.has_step_tables():
            self._step.fill_(step)

    def bind_step(self, step: torch.Tensor | None) -> None:
        """Read the step index of per-step tables from the shared ``[1]`` long tensor ``step``
        (``None``: back to the unit's own, set by ``set_step``)."""
        self._shared_step = step

    def step_index(self) -> torch.Tensor:
        return self._step if self._shared_step is None else self._shared_step

    def has_step_tables(self) -> bool:
        return any(bank.num_steps for bank in self.activation_banks().values())

    def step_rows(self) -> int | None:
        rows = {bank.num_steps for bank in self.activation_banks().values() if bank.num_steps}
        return max(rows) if rows else None

    # -- the forward helper ---------------------------------------------------------------------
    def quantize(self, bank: ActivationBank, x: torch.Tensor, heads: int = 1) -> torch.Tensor:
        """``x`` through ``bank`` at this unit's active choice (rows laid out with ``heads``).

        The hot path of every quantized call. Eager mode pays for each Python step, so buffers
        are read from ``_buffers`` (``self._choice`` would go through ``nn.Module.__getattr__``)
        and the bank is called as a function, not as a module."""
        table = self._table
        choice = self._buffers["_choice"] if table is None else table[self._row]
        step = self._shared_step
        if step is None:
            step = self._buffers["_step"]
        return bank.forward(x, choice, heads, step)

    def bits_label(self) -> str:
        return f"a{self.default_bits}, options={self.options}"


def fp_bits(bits):
    """Bypass widths count as 32 in cost accounting (an int, or an array of bit-widths)."""
    if isinstance(bits, int):
        return BYPASS_BITS if is_bypass(bits) else bits
    return np.minimum(bits, BYPASS_BITS)


def verify_calibrated(units: dict[str, QuantUnit]) -> None:
    """Raise, naming the first one, if any unit holds an activation quantizer that was never
    calibrated. One read of the device for all units: call it before a run, not per step."""
    flags, names = [], []
    for name, unit in units.items():
        for part, bank in unit.activation_banks().items():
            calibrated = bank.stack.calibrated_all()
            if calibrated is not None:
                flags.append(calibrated)
                names.append(f"{name}.{part}")
    if not flags:
        return
    ok = torch.stack(flags).tolist()
    if not all(ok):
        first = names[ok.index(False)]
        raise RuntimeError(
            f"the activation quantizer {first} (and {ok.count(False) - 1} more) was never "
            "calibrated; run a quantization method (e.g. qlip.methods.rtn) before using the model"
        )


@contextmanager
def activations_bypassed(units: dict[str, QuantUnit]) -> Iterator[None]:
    """Every activation bank of ``units`` (softmax included) passes its input through unquantized
    while inside (full-precision reference passes of the calibration methods)."""
    banks = [bank for unit in units.values() for bank in unit.activation_banks().values()]
    saved = [bank.enabled for bank in banks]
    try:
        for bank in banks:
            bank.enabled = False
        yield
    finally:
        for bank, enabled in zip(banks, saved):
            bank.enabled = enabled
