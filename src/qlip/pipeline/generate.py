"""Generation with a quantized UNet: every step, the bit policy sets each unit's bits (max over the
batch), per-step tables are told the step index, and the ledger accounts the cost per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantUnit, quant_units
from ..policies import BitPolicy, FixedBits
from .accounting import BitLedger, ImageReport, MacCounter
from .prompts import check_prompts, encode_prompt_batch


@dataclass
class GenerationConfig:
    steps: int = 25
    guidance: float = 7.5
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    truncate: bool = False  # allow prompts over the tokenizer's limit (cut, as CLIP pipelines do)


@dataclass
class GenerationResult:
    images: list[Image.Image] = field(default_factory=list)
    reports: list[ImageReport] = field(default_factory=list)


def dynamic_units(units: dict[str, QuantUnit]) -> dict[str, QuantUnit]:
    return {n: u for n, u in units.items() if u.dynamic}


def bank_options(unit: QuantUnit) -> tuple[int, ...]:
    banks = unit.act_banks if hasattr(unit, "act_banks") else [unit.q_bank]
    return banks[0].options


class StepController:
    """UNet forward pre-hook: sets the bits and the step index of every unit before each call."""

    def __init__(self, unet: nn.Module, policy: BitPolicy | None, units: dict[str, QuantUnit]):
        self.units = units
        self.dynamic = dynamic_units(units)
        self.policy = policy
        self.ledger = BitLedger(units)
        self.step = 0
        self._counter: MacCounter | None = MacCounter(unet)
        self._handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        requested = {}
        if self.policy is not None and self.dynamic:
            bits = self.policy.bits(self.step, float(torch.as_tensor(timestep).flatten()[0]))
            for j, (name, unit) in enumerate(self.dynamic.items()):
                requested[name] = bits[:, j]
                unit.abits = int(bits[:, j].max())
        for unit in self.units.values():
            unit.set_step(self.step)
        self.ledger.record_step(requested)
        if self.step == 0 and self._counter is not None:
            self._counter.__enter__()
        elif self._counter is not None:
            self._counter.__exit__()
            self.ledger.sites = self._counter.sites
            self._counter = None
        self.step += 1

    def close(self) -> None:
        if self._counter is not None:  # a single-step run: the first call's sites are complete
            self._counter.__exit__()
            self.ledger.sites = self._counter.sites
            self._counter = None
        self._handle.remove()


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    policy: BitPolicy | None = None,
    config: GenerationConfig | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate one image per (prompt, seed) with the pipeline's (quantized) UNet.

    >>> result = generate(pipe, ["a red circle"], seeds=[0], policy=FixedBits(8))  # doctest: +SKIP
    >>> result.reports[0].fab
    8.0
    """
    config = config or GenerationConfig()
    prompts = list(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    check_prompts(pipe, prompts, config.truncate)
    units = quant_units(pipe.unet)
    if units and policy is None:
        policy = FixedBits(next(iter(units.values())).abits)
    if policy is not None:
        policy.bind({n: bank_options(u) for n, u in dynamic_units(units).items()})
    device = pipe.unet.device
    result = GenerationResult()
    bar = tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress)
    for start, batch in _batches(prompts, config.batch_size):
        batch_seeds = list(seeds[start : start + len(batch)])
        if policy is not None:
            policy.begin(encode_prompt_batch(pipe, batch), config.steps)
        controller = StepController(pipe.unet, policy, units)
        try:
            out = pipe(
                batch,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=[torch.Generator(device).manual_seed(s) for s in batch_seeds],
            )
        finally:
            controller.close()
        cfg = 2 if config.guidance > 1.0 else 1
        result.images.extend(out.images)
        result.reports.extend(controller.ledger.reports(batch, batch_seeds, cfg))
        bar.update(len(batch))
    bar.close()
    return result
