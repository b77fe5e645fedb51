"""The bit-policy interface and the fixed-bits policy (WxAy)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..quant import check_bits


@dataclass
class PromptBatch:
    """What a policy may read about the prompts of one generation batch."""

    prompts: list[str]
    input_ids: torch.Tensor  # [B, L]
    hidden_states: torch.Tensor  # [B, L, D] the text encoder's last hidden state
    pooled: torch.Tensor  # [B, D'] end-of-text state (through the text projection where there is one)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def device(self) -> torch.device:
        return self.pooled.device


class BitPolicy(ABC):
    """Decides, once per denoising step, the activation bits of every dynamic unit for every prompt
    of the batch. The seam runs each unit at the maximum over the batch (``batch_mode="max"``) or
    each prompt at its own bits (``"per_image"``).

    Lifecycle: ``bind(options)`` once with the dynamic units' bank options (by unit name, in a fixed
    order), ``begin(batch, num_steps)`` per generation batch, ``bits(step, timestep)`` per step.
    ``bits`` runs in the denoising loop: it should return a tensor on ``batch.device`` and never
    read tensor values in Python (that would sync the host with the device every step).
    """

    unit_names: list[str]
    reads_prompt = True  # begin() reads the batch's text (a run without encoded prompts refused)

    def bind(self, options: Mapping[str, tuple[int, ...]]) -> None:
        self.unit_names = list(options)
        self.check_options(options)

    @abstractmethod
    def possible_bits(self) -> set[int]:
        """Every bit-width this policy may ask for."""

    def check_options(self, options: Mapping[str, tuple[int, ...]]) -> None:
        """Raise a ValueError if this policy may ask for bits a unit has no quantizer for."""
        wanted = self.possible_bits()
        missing = [name for name, opts in options.items() if not wanted <= set(opts)]
        if missing:
            have = sorted({b for opts in options.values() for b in opts})
            raise ValueError(
                f"{self.describe()} needs activation bits {sorted(wanted)}, not calibrated for "
                f"{len(missing)} layers (e.g. {missing[0]}); this quantized model has {have}: "
                "quantize with --abits-options covering them"
            )

    @abstractmethod
    def begin(self, batch: PromptBatch, num_steps: int) -> None: ...

    @abstractmethod
    def bits(self, step: int, timestep: torch.Tensor) -> torch.Tensor:
        """[B, U] integer bit-widths, U = len(unit_names); ``step`` is the step index, ``timestep``
        the scheduler's timestep (a tensor, possibly on the device)."""

    def describe(self) -> str:
        return type(self).__name__


class PlannedBits(BitPolicy):
    """A policy whose ``begin`` plans every step's bits of the batch at once (``[S, B, U]`` in
    ``self._bits``); ``bits(step)`` is then a slice, never a decision."""

    _bits: torch.Tensor

    @property
    def planned(self) -> torch.Tensor:
        """``[S, B, U]`` the bits ``begin`` chose for the current batch (every step, prompt, unit)."""
        return self._bits

    def bits(self, step: int, timestep: torch.Tensor) -> torch.Tensor:
        return self._bits[step]


class FixedBits(BitPolicy):
    """Every dynamic unit at ``abits`` for every prompt and step (the static WxAy setting)."""

    reads_prompt = False

    def __init__(self, abits: int):
        self.abits = check_bits(abits, "abits")
        self._bits = torch.empty(0, 0, dtype=torch.long)

    def possible_bits(self) -> set[int]:
        return {self.abits}

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        shape = (len(batch), len(self.unit_names))
        self._bits = torch.full(shape, self.abits, dtype=torch.long, device=batch.device)

    def bits(self, step: int, timestep: torch.Tensor) -> torch.Tensor:
        return self._bits

    def describe(self) -> str:
        return f"fixed A{self.abits}"
