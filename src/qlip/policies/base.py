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


class BitPolicy(ABC):
    """Decides, once per denoising step, the activation bits of every dynamic unit for every prompt
    of the batch. The caller runs each unit at the maximum over the batch.

    Lifecycle: ``bind(options)`` once with the dynamic units' bank options (by unit name, in a fixed
    order), ``begin(batch, num_steps)`` per generation batch, ``bits(step, timestep)`` per step.
    """

    unit_names: list[str]

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
    def bits(self, step: int, timestep: float) -> torch.Tensor:
        """[B, U] integer bit-widths, U = len(unit_names)."""

    def describe(self) -> str:
        return type(self).__name__


class FixedBits(BitPolicy):
    """Every dynamic unit at ``abits`` for every prompt and step (the static WxAy setting)."""

    def __init__(self, abits: int):
        self.abits = check_bits(abits, "abits")
        self._batch_size = 0

    def possible_bits(self) -> set[int]:
        return {self.abits}

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        self._batch_size = len(batch)

    def bits(self, step: int, timestep: float) -> torch.Tensor:
        return torch.full((self._batch_size, len(self.unit_names)), self.abits, dtype=torch.long)

    def describe(self) -> str:
        return f"fixed A{self.abits}"
