"""QLIPPolicy: T2Q scores each prompt once at ``begin``; Q2B's argmax bits of every step are
computed then too (one small batched op), so ``bits`` is a slice: no host sync per step. A
timestep-only Q2B (``Q2BConfig.ignore_prompt``, issue 12's control) runs without T2Q and
without reading the prompt."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..methods.qlip import QLIPModules
from .base import PlannedBits, PromptBatch


class QLIPPolicy(PlannedBits):
    """The prompt decides every dynamic unit's bits at every step.

    >>> policy = QLIPPolicy(load_qlip("runs/w4-qlip"))  # doctest: +SKIP
    >>> generate(pipe, prompts, seeds, policy, GenerationConfig(batch_mode="per_image"))  # doctest: +SKIP
    """

    def __init__(self, modules: QLIPModules):
        self.modules = modules
        self.reads_prompt = not modules.ignores_prompt
        self._bits = torch.empty(0, 0, 0, dtype=torch.long)
        self.quality = torch.empty(0)

    def possible_bits(self) -> set[int]:
        return set(self.modules.q2b.config.bits)

    def bind(self, options: Mapping[str, tuple[int, ...]]) -> None:
        if list(options) != self.modules.unit_names:
            raise ValueError(f"QLIP was trained for {len(self.modules.unit_names)} dynamic units "
                             f"({self.modules.unit_names[:2]}...), this model has {len(options)} "
                             f"({list(options)[:2]}...): train QLIP again for this model")
        super().bind(options)

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        q2b = self.modules.q2b
        if num_steps > q2b.num_steps:
            raise ValueError(f"Q2B was trained for {q2b.num_steps} steps; got {num_steps}: sample "
                             f"with --steps {q2b.num_steps} or train again")
        device = batch.device
        q2b = q2b.to(device)
        with torch.no_grad():
            if self.modules.t2q is None:  # timestep-only: Q2B reads no quality
                self.quality = torch.full((len(batch),), 0.5, device=device)
            else:
                self.quality = self.modules.t2q.to(device)(batch.pooled)  # [B]
            self._bits = q2b.bits(self.quality, torch.arange(num_steps, device=device))  # [S, B, U]

    def describe(self) -> str:
        kind = "QLIP timestep-only" if self.modules.ignores_prompt else "QLIP"
        return f"{kind} A{{{','.join(map(str, self.modules.q2b.config.bits))}}}"
