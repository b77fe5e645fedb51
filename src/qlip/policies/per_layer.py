"""PerLayerBits: issue 12's fixed per-layer control. One bit-width per dynamic unit, the same at
every step and for every prompt (e.g. the greedy assignment of ``qlip per-layer``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..quant import check_bits
from .base import BitPolicy, PromptBatch


class PerLayerBits(BitPolicy):
    """Unit ``name`` at ``assignment[name]`` bits, always.

    >>> policy = PerLayerBits({"down_blocks.0.resnets.0.conv1": 4, ...})  # doctest: +SKIP
    """

    reads_prompt = False

    def __init__(self, assignment: Mapping[str, int], label: str = "per-layer"):
        if not assignment:
            raise ValueError("a per-layer assignment needs at least one unit")
        self.assignment = {name: check_bits(int(b), f"bits of {name}")
                           for name, b in assignment.items()}
        self.label = label
        self._bits = torch.empty(0, 0, dtype=torch.long)

    def possible_bits(self) -> set[int]:
        return set(self.assignment.values())

    def bind(self, options: Mapping[str, tuple[int, ...]]) -> None:
        missing = [n for n in options if n not in self.assignment]
        extra = [n for n in self.assignment if n not in options]
        if missing or extra:
            odd = (missing or extra)[0]
            raise ValueError(f"the assignment does not fit this model's {len(options)} dynamic "
                             f"units ({len(missing)} unassigned, {len(extra)} unknown, e.g. "
                             f"{odd}): compute it for this quantized model (`qlip per-layer`)")
        super().bind(options)
        self._row = torch.tensor([self.assignment[n] for n in self.unit_names], dtype=torch.long)

    def check_options(self, options: Mapping[str, tuple[int, ...]]) -> None:
        for name, opts in options.items():
            if self.assignment[name] not in opts:
                raise ValueError(f"the assignment puts {name} at {self.assignment[name]} bits; "
                                 f"this model has {list(opts)} for it")

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        row = self._row.to(batch.device)
        self._bits = row.expand(len(batch), -1)  # [B, U]

    def bits(self, step: int, timestep: torch.Tensor) -> torch.Tensor:
        return self._bits

    def describe(self) -> str:
        mean = sum(self.assignment.values()) / len(self.assignment)
        return f"{self.label} (mean {mean:.3f} bits over {len(self.assignment)} units)"
