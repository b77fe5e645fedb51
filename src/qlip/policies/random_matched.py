"""RandomMatchedBits: issue 12's random control. Every image's bits at each (step, unit) are drawn,
independently, from the empirical distribution over images of a reference run's bits at that
(step, unit) (e.g. QLIP's own requested bits): the same bit proportions per layer and step as the
reference, with the prompt's say removed.

A prompt's draw is keyed by its text (as the tokenizer saw it) and the policy's seed, so the same
prompt gets the same bits in any batch and any run. ``begin`` draws the batch's uniforms on the
CPU (one small generator per prompt) and turns them into bits on the device against cumulative
tables made once at ``bind`` (``searchsorted``); ``bits`` is a slice: no host sync per step."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from .base import PlannedBits, PromptBatch


def prompt_generator(seed: int, prompt: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, prompt)`` alone (sha256: stable across runs and
    machines, unlike Python's ``hash``)."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class RandomMatchedBits(PlannedBits):
    """Bits drawn per (step, unit) from a reference's proportions over images.

    ``reference``: ``[images, steps, units]`` bit-widths (``bits.safetensors``' ``requested``),
    ``unit_names``: its columns (every quantized unit; the dynamic ones are picked by name).

    >>> bits, requested, names = load_generation_bits("runs/eval_qlip")  # doctest: +SKIP
    >>> policy = RandomMatchedBits(requested, names, seed=0)  # doctest: +SKIP
    """

    reads_prompt = True  # the draw is keyed by the prompt's text

    def __init__(self, reference: np.ndarray | torch.Tensor, unit_names: list[str], seed: int = 0):
        ref = torch.as_tensor(np.asarray(reference)).long()
        if ref.ndim != 3 or ref.shape[0] < 1 or ref.shape[1] < 1:
            raise ValueError(f"the reference bits must be [images, steps, units] with at least one "
                             f"image and step; got shape {tuple(ref.shape)}")
        if ref.shape[2] != len(unit_names) or len(set(unit_names)) != len(unit_names):
            raise ValueError(f"the reference bits have {ref.shape[2]} unit columns but "
                             f"{len(unit_names)} unit names (or repeated names)")
        self.reference, self.reference_units, self.seed = ref, list(unit_names), int(seed)
        self.digest = hashlib.sha256(ref.to(torch.uint8).numpy().tobytes()).hexdigest()[:12]
        self.values = torch.unique(ref)  # [K] every bit-width the reference holds, sorted
        self._cdf = torch.empty(0, 0, 0, dtype=torch.float64)
        self._used = torch.empty(0, 0, dtype=torch.bool)
        self._bits = torch.empty(0, 0, 0, dtype=torch.long)

    @property
    def num_steps(self) -> int:
        return self.reference.shape[1]

    def bind(self, options: Mapping[str, tuple[int, ...]]) -> None:
        missing = [n for n in options if n not in self.reference_units]
        if missing:
            raise ValueError(f"the reference bits hold no column for {len(missing)} of the "
                             f"{len(options)} dynamic units (e.g. {missing[0]}): take --bits-from "
                             "an eval or generate run of this quantized model")
        columns = self.reference[:, :, [self.reference_units.index(n) for n in options]]
        counts = (columns[..., None] == self.values).sum(0).double()  # [S, U, K]
        self._used = counts.sum(0) > 0  # [U, K]: the widths each unit may be drawn at
        self._cdf = counts.cumsum(-1) / columns.shape[0]
        self._cdf[..., -1] = 1.0  # exactly: a uniform in [0, 1) never falls past the last option
        super().bind(options)

    def possible_bits(self) -> set[int]:
        return set(self.values.tolist())

    def check_options(self, options: Mapping[str, tuple[int, ...]]) -> None:
        """Each unit must have a quantizer for every width the reference gives it."""
        for j, (name, opts) in enumerate(options.items()):
            wanted = set(self.values[self._used[j]].tolist())
            if not wanted <= set(opts):
                raise ValueError(f"the reference runs {name} at {sorted(wanted)} bits; this "
                                 f"model has {list(opts)} for it: use a reference run of this "
                                 "model")

    def begin(self, batch: PromptBatch, num_steps: int) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"the reference bits cover {self.num_steps} UNet calls per image; this "
                             f"run makes {num_steps}: sample with the reference run's --steps")
        shape = (self.num_steps, len(self.unit_names))
        uniform = torch.stack([torch.rand(shape, generator=prompt_generator(self.seed, p),
                                          dtype=torch.float64) for p in batch.prompts])  # [B, S, U]
        device = batch.device
        cdf = self._cdf.to(device)
        slots = torch.searchsorted(cdf, uniform.to(device).permute(1, 2, 0).contiguous(),
                                   right=True)  # [S, U, B]
        self._bits = self.values.to(device)[slots].permute(0, 2, 1)  # [S, B, U]

    def describe(self) -> str:
        widths = ",".join(map(str, self.values.tolist()))
        return f"random-matched A{{{widths}}} to reference {self.digest} (seed {self.seed})"
