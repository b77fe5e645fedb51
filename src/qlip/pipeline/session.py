"""Sampling sessions: the hooks that make a pipeline's own ``pipe(prompt, ...)`` call a quantized
sampling run. The scheduler's ``set_timesteps`` opens a run (the per-step tables are checked
against its UNet calls), the last text tower's forward gives the policy its prompts, a UNet
forward pre-hook (:class:`StepController`, the one step counter) asks the policy once per step
and tells every unit its bits and step, and the scheduler's last ``step`` closes the run with a
per-image cost report (:class:`SamplingRecord`). ``generate`` and ``attach_quantization`` both
sample through a :class:`SamplingSession`."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..nn import QuantUnit, quant_units, verify_calibrated
from ..policies import BitPolicy, FixedBits, PromptBatch
from .accounting import BitLedger, ImageReport, MacCounter
from .prompts import text_states, text_towers
from .ptqd_sampling import PTQDScheduler

BATCH_MODES = ("max", "per_image")
ATTACHED = "qlip"  # the pipeline attribute that holds an attached quantization (pipe.qlip)


def dynamic_units(units: dict[str, QuantUnit]) -> dict[str, QuantUnit]:
    return {n: u for n, u in units.items() if u.dynamic}


def check_step_tables(units: dict[str, QuantUnit], steps: int, calls: int | None = None) -> None:
    """Per-step tables have one row per sampling step (UNet call): refuse a run that makes more
    calls than a table has rows, up front. ``calls``: the run's UNet calls (default ``steps``)."""
    calls = steps if calls is None else calls
    for name, unit in units.items():
        rows = unit.step_rows()
        if rows is not None and calls > rows:
            raise ValueError(
                f"{name}: its activation quantizers hold a per-step table of {rows} steps (a "
                f"row per UNet call) but {steps} steps make {calls} UNet calls with this "
                "scheduler; sample with the scheduler and number of steps it was calibrated with"
            )


class StepController:
    """The one place that counts denoising steps and applies the policy's decision: a UNet forward
    pre-hook. Every dynamic unit reads its choice from one shared table and every unit its step
    index from one shared tensor, so a step costs one policy call and a few small device ops —
    no host sync, nothing that would recompile a compiled UNet."""

    def __init__(
        self, unet: nn.Module, policy: BitPolicy | None, units: dict[str, QuantUnit],
        batch_mode: str = "max", num_images: int = 1, count_macs: bool = True,
        hook: bool = True,
    ):
        self.units = units
        rows = [r for r in (u.step_rows() for u in units.values()) if r is not None]
        self.max_steps = min(rows) if rows else None  # per-step tables: no call past their rows
        self.dynamic = list(dynamic_units(units).values())
        self.policy = policy if self.dynamic else None
        self.ledger = BitLedger(units, list(dynamic_units(units)), batch_mode)
        self.per_image = batch_mode == "per_image"
        self.step = 0
        device = next(unet.parameters()).device
        self._step = torch.zeros(1, dtype=torch.long, device=device)
        for unit in units.values():
            unit.bind_step(self._step)
        if self.policy is not None:
            count = len(self.dynamic)
            self._lookup = torch.stack([u.slot_lookup() for u in self.dynamic])
            rows = torch.arange(count, device=device)
            self._rows = rows[:, None] if self.per_image else rows
            shape = (count, num_images) if self.per_image else (count, 1)
            self._choices = torch.zeros(shape, dtype=torch.long, device=device)
            for j, unit in enumerate(self.dynamic):
                unit.bind_bits(self._choices, j)
        self._counter: MacCounter | None = MacCounter(unet) if count_macs else None
        # hook=False: the owner calls the controller from its own hook (a sampling session)
        self._handle = unet.register_forward_pre_hook(self, with_kwargs=True) if hook else None

    def detach(self) -> None:
        """Stop running as the UNet's hook (a caller that drives a compiled forward calls the
        controller itself before each step)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, module, args, kwargs):
        if self.max_steps is not None and self.step >= self.max_steps:
            raise RuntimeError(f"UNet call {self.step + 1} of this run has no row in the per-step "
                               f"activation tables ({self.max_steps} rows); sample with the "
                               "scheduler and steps the model was calibrated with")
        self._step.fill_(self.step)
        if self.policy is not None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            requested = self.policy.bits(self.step, torch.as_tensor(timestep))  # [B, U]
            requested = requested.to(self._step.device, non_blocking=True)
            run = requested.T if self.per_image else requested.amax(dim=0)  # [U, n] or [U]
            slots = self._lookup[self._rows, run]  # [U, n] or [U]
            self._choices.copy_(slots if self.per_image else slots[:, None])
            self.ledger.record_step(run, requested)
        else:
            self.ledger.record_step()
        if self.step == 0 and self._counter is not None:
            self._counter.__enter__()
        elif self._counter is not None:
            self._close_counter()
        self.step += 1

    def _close_counter(self) -> None:
        self._counter.__exit__()
        self.ledger.sites = self._counter.sites
        self._counter = None

    def close(self) -> None:
        if self._counter is not None:  # a single-step run: the first call's sites are complete
            self._close_counter()
        self.detach()
        for unit in self.units.values():  # back to the units' own bits and steps
            unit.bind_step(None)
        for unit in self.dynamic:
            unit.bind_bits(None, 0)



@dataclass
class SamplingRecord:
    """What one pipeline call ran: a cost report per image, and every image's bits per UNet call
    and unit (``bits[i, s, u]`` as run, ``requested`` what the policy asked for image i alone;
    unit ``unit_names[u]``, fixed units at their own bits, 32 = FP; None without quantized
    units)."""

    reports: list[ImageReport] = field(default_factory=list)
    unit_names: list[str] = field(default_factory=list)
    bits: np.ndarray | None = None  # [images, calls, units] uint8
    requested: np.ndarray | None = None  # [images, calls, units] uint8

    @classmethod
    def from_ledger(cls, ledger: BitLedger, reports: list[ImageReport]) -> SamplingRecord:
        if not ledger.units:
            return cls(reports)
        run, requested = ledger.unit_bits(len(reports))
        bits, asked = [np.ascontiguousarray(np.stack([t[n] for n in run], -1).transpose(1, 0, 2),
                                            np.uint8) for t in (run, requested)]  # [S, n, U]->[n, S, U]
        return cls(reports, list(run), bits, asked)


def base_scheduler(scheduler):
    """The diffusers scheduler under qlip's wrappers (PTQD's, a session's)."""
    while isinstance(scheduler, (PTQDScheduler, SessionScheduler)):
        scheduler = scheduler.scheduler
    return scheduler


def unet_calls(pipe, steps: int) -> int:
    """How many UNet calls the pipeline's scheduler makes for ``steps`` sampling steps (PNDM,
    SD 1.x's default, makes one more: it repeats a timestep)."""
    scheduler = copy.deepcopy(base_scheduler(pipe.scheduler))
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _then(method, after):
    """``method`` followed by ``after()``, with ``method``'s signature: diffusers' pipelines
    read the scheduler's signatures to decide what they pass (``eta`` and ``generator`` to
    ``step``, ``timesteps`` and ``sigmas`` to ``set_timesteps``), so a ``*args`` wrapper would
    silently drop them."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        out = method(*args, **kwargs)
        after()
        return out

    return call


class SessionScheduler:
    """Wraps the pipeline's scheduler (PTQD's wrapper included): ``set_timesteps`` opens a
    session's run, each ``step`` may close it; everything else is the wrapped scheduler's.
    Both keep the wrapped methods' signatures (``inspect.signature`` follows ``__wrapped__``)."""

    def __init__(self, scheduler, session: SamplingSession):
        self.scheduler = scheduler
        self.session = session
        self.set_timesteps = _then(scheduler.set_timesteps, lambda: session._open(scheduler))
        self.step = _then(scheduler.step, session._stepped)

    def __getattr__(self, name: str):
        if name in ("scheduler", "session"):  # not set yet (copy/unpickle): avoid recursing
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __deepcopy__(self, memo):  # the copy's wrappers call the copied scheduler and session
        return SessionScheduler(copy.deepcopy(self.scheduler, memo),
                                copy.deepcopy(self.session, memo))


MAX_TEXT_CALLS = 4  # text-encoder calls kept per run: the prompt's comes first
MAC_SITES = "_qlip_mac_sites"  # the UNet attribute holding the counted MAC sites


class SamplingSession:
    """Makes every ``pipe(...)`` call of ``pipe`` a quantized sampling run: the bit policy (fixed
    bits by default) sets every dynamic unit's bits once per step, per-step tables follow the
    step, PTQD's wrapped scheduler (if any) stays in place, and each call leaves its
    :class:`SamplingRecord` in ``last``. ``close()`` removes every hook.

    >>> session = SamplingSession(pipe, FixedBits(8))  # doctest: +SKIP
    >>> pipe("a red circle", num_inference_steps=10)  # doctest: +SKIP
    >>> session.last.reports[0].fab  # doctest: +SKIP
    8.0
    """

    def __init__(self, pipe, policy: BitPolicy | None = None, batch_mode: str = "max",
                 count_macs: bool = True):
        self.pipe = pipe
        self.units = quant_units(pipe.unet)
        verify_calibrated(self.units)
        self.count_macs = count_macs
        self.policy: BitPolicy | None = None
        self.batch_mode = "max"
        self.use(policy, batch_mode)
        self.last: SamplingRecord | None = None
        self._texts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._run: dict | None = None  # the run in progress: steps, calls, texts, controller
        # MAC sites by (units, latent shape, text shape), counted once per UNet: kept on it, so
        # the sessions of later generate() calls (an eval's batches) reuse them
        self._sites: dict[tuple, list] = pipe.unet.__dict__.setdefault(MAC_SITES, {})
        tokenizer, encoder = text_towers(pipe)[-1]
        self._tokenizer = tokenizer
        self._handles = [
            pipe.unet.register_forward_pre_hook(self._unet_call, with_kwargs=True),
            encoder.register_forward_hook(self._text_call, with_kwargs=True),
        ]
        self._scheduler = SessionScheduler(pipe.scheduler, self)
        pipe.scheduler = self._scheduler

    def use(self, policy: BitPolicy | None = None, batch_mode: str | None = None) -> None:
        """Sample with ``policy`` (None: every dynamic unit at its default bits) and
        ``batch_mode`` (``"max"`` or ``"per_image"``; None: unchanged) from the next call on."""
        batch_mode = self.batch_mode if batch_mode is None else batch_mode
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}; got {batch_mode!r}")
        dynamic = dynamic_units(self.units)
        if dynamic and policy is None:
            policy = FixedBits(next(iter(dynamic.values())).default_bits)
        if policy is not None and dynamic:
            policy.bind({n: u.options for n, u in dynamic.items()})
        self.policy, self.batch_mode = policy, batch_mode

    @contextmanager
    def using(self, policy: BitPolicy | None, batch_mode: str | None) -> Iterator[SamplingSession]:
        """:meth:`use` for the calls inside the block, then back to the session's own."""
        saved = self.policy, self.batch_mode
        self.use(policy or saved[0], batch_mode)
        try:
            yield self
        finally:
            self.use(*saved)

    def counting_macs(self) -> bool:
        """Whether the UNet call under way is the one the cost ledger counts MACs on (the first
        of a run, with forward hooks on every layer): a compiled UNet runs it eagerly."""
        run = self._run
        return (run is not None and run["controller"] is not None
                and run["controller"]._counter is not None)

    def close(self) -> None:
        """Remove the hooks and give the pipeline back the scheduler it had."""
        self._abandon()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.pipe.scheduler is self._scheduler:
            self.pipe.scheduler = self._scheduler.scheduler

    # -- the hooks ---------------------------------------------------------------------------

    def _open(self, scheduler) -> None:
        """``set_timesteps``: a new run; refuse one the per-step tables cannot serve."""
        self._abandon()  # a run cut short (an exception inside the pipeline call)
        calls = len(scheduler.timesteps)
        steps = getattr(scheduler, "num_inference_steps", None) or calls
        check_step_tables(self.units, steps, calls)
        self._run = {"steps": steps, "calls": calls, "texts": self._texts, "controller": None}
        self._texts = []

    def _text_call(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or len(self._texts) >= MAX_TEXT_CALLS:
            return
        hidden, pooled = text_states(output)
        self._texts.append((ids.detach(), hidden.detach().float(), pooled.detach().float()))

    def _unet_call(self, module, args, kwargs) -> None:
        run = self._run
        if run is None:  # a UNet call outside a pipeline run: the units keep their own bits
            return
        if run["controller"] is None:
            sample = kwargs.get("sample", args[0] if args else None)
            halves = 2 if getattr(self.pipe, "do_classifier_free_guidance", False) else 1
            images = sample.shape[0] // halves
            batch = self._prompt_batch(run["texts"], images)
            if self.policy is not None:
                self.policy.begin(batch, run["calls"])
            # MACs per image depend on the units and on the shapes of an image's latents and
            # text, not on the batch: counted on the first run of each, reused after (no
            # hooks, so a compiled UNet runs every call of a later run compiled)
            context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            key = (tuple((n, u.fab_member) for n, u in self.units.items()),
                   tuple(sample.shape[1:]),
                   tuple(context.shape[1:]) if isinstance(context, torch.Tensor) else None)
            sites = self._sites.get(key)
            controller = StepController(module, self.policy, self.units, self.batch_mode,
                                        images, self.count_macs and sites is None, hook=False)
            if sites is not None:
                controller.ledger.sites = list(sites)
            run |= {"halves": halves, "prompts": batch.prompts, "controller": controller,
                    "shape_key": key}
        run["controller"](module, args, kwargs)

    def _stepped(self) -> None:
        run = self._run
        if run is None or run["controller"] is None or run["controller"].step < run["calls"]:
            return
        controller = run["controller"]
        controller.close()
        if self.count_macs and controller.ledger.sites:
            self._sites.setdefault(run["shape_key"], list(controller.ledger.sites))
        prompts = run["prompts"]
        reports = controller.ledger.reports(prompts, [None] * len(prompts), run["halves"],
                                            run["steps"])
        self.last = SamplingRecord.from_ledger(controller.ledger, reports)
        self._run = None

    def _abandon(self) -> None:
        if self._run is not None and self._run["controller"] is not None:
            self._run["controller"].close()
        self._run = None

    def _prompt_batch(self, texts: list, images: int) -> PromptBatch:
        """The prompts of this run as the policy reads them: the first text-encoder call of the
        run (the prompt's; SDXL: its second tower's), repeated per image of a prompt."""
        device = self.pipe.unet.device
        if not texts:
            if self.policy is not None and self.policy.reads_prompt:
                raise ValueError(f"{self.policy.describe()} reads the prompt, but this pipeline "
                                 "call encoded none (prompt_embeds given?): pass prompt=...")
            empty = torch.zeros(images, 0, device=device)
            return PromptBatch([""] * images, empty.long(), empty[..., None], empty)
        ids, hidden, pooled = texts[0]
        if images % ids.shape[0]:
            raise ValueError(f"the UNet batch holds {images} images for {ids.shape[0]} prompts; "
                             "qlip cannot tell which image is which prompt's")
        repeat = images // ids.shape[0]  # num_images_per_prompt: diffusers repeats each prompt
        ids, hidden, pooled = (t.repeat_interleave(repeat, 0) for t in (ids, hidden, pooled))
        # the text as the tokenizer saw it (what a report can name; word ends as spaces)
        prompts = [" ".join(text.replace("</w>", " ").split())
                   for text in self._tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return PromptBatch(prompts, ids, hidden, pooled)


def session_of(pipe) -> SamplingSession | None:
    """The session of a quantization attached to ``pipe`` (``pipe.qlip``), if any."""
    return getattr(getattr(pipe, "__dict__", {}).get(ATTACHED), "session", None)


@contextmanager
def sampling_session(pipe, policy: BitPolicy | None = None, batch_mode: str = "max"
                     ) -> Iterator[SamplingSession]:
    """The pipeline's attached session with ``policy`` and ``batch_mode`` for the block (None:
    the attached policy), or a session of its own, closed after the block."""
    attached = session_of(pipe)
    if attached is not None:
        with attached.using(policy, batch_mode) as session:
            yield session
        return
    session = SamplingSession(pipe, policy, batch_mode)
    try:
        yield session
    finally:
        session.close()
