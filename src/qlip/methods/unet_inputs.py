"""One UNet call's inputs, and the one function that calls a UNet with them.

Capture, calibration, reconstruction, PTQD's statistics and anything else in qlip that runs a
UNet on recorded inputs goes through :func:`call_unet`, so every conditioning input the pipeline
gave the UNet (SDXL's ``added_cond_kwargs``, LCM's ``timestep_cond``, ``class_labels``, masks,
``cross_attention_kwargs``) reaches it again: none is dropped on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

# UNet2DConditionModel.forward's parameters, in positional order
FORWARD_PARAMETERS = (
    "sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond",
    "attention_mask", "cross_attention_kwargs", "added_cond_kwargs",
    "down_block_additional_residuals", "mid_block_additional_residual",
    "down_intrablock_additional_residuals", "encoder_attention_mask", "return_dict",
)
# optional per-row tensors, carried as they are
OPTIONAL_TENSORS = ("class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask")
# ControlNet / T2I-adapter residuals: inputs of another model, not of the UNet being quantized
UNSUPPORTED = ("down_block_additional_residuals", "mid_block_additional_residual",
               "down_intrablock_additional_residuals")
ADDED = "added_cond_kwargs"


@dataclass
class UNetInputs:
    """The inputs of one UNet call over a batch of rows (both guidance halves are rows).

    >>> inputs = UNetInputs(x, t, c, added_cond_kwargs={"text_embeds": e, "time_ids": ids})
    >>> eps = call_unet(unet, inputs)  # doctest: +SKIP
    """

    sample: torch.Tensor  # [B, C, H, W]  x_t
    timestep: torch.Tensor | float | int  # [] or [B]
    encoder_hidden_states: torch.Tensor  # [B, L, D]
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds
    # [B, D'], time_ids [B, 6]
    timestep_cond: torch.Tensor | None = None  # [B, D''] (LCM's guidance embedding)
    class_labels: torch.Tensor | None = None  # [B] or [B, D''']
    attention_mask: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None  # [B, L]
    cross_attention_kwargs: dict[str, Any] | None = None  # one for the batch (LoRA's {"scale": s})

    @classmethod
    def from_call(cls, args: Sequence, kwargs: dict[str, Any]) -> UNetInputs:
        """The inputs of a UNet call as a forward pre-hook (``with_kwargs=True``) sees them."""
        named = dict(zip(FORWARD_PARAMETERS, args))
        named.update(kwargs)
        unknown = sorted(set(named) - set(FORWARD_PARAMETERS))
        if unknown:
            raise ValueError(f"the UNet was called with {unknown}, which qlip does not know; only "
                             f"UNet2DConditionModel's inputs {list(FORWARD_PARAMETERS)} are carried")
        given = [name for name in UNSUPPORTED if named.get(name) is not None]
        if given:
            raise ValueError(f"the pipeline passes {given} (ControlNet/adapter residuals) to the "
                             "UNet; qlip cannot record those: calibrate without the ControlNet")
        added = named.get(ADDED) or {}
        odd = [k for k, v in added.items() if not isinstance(v, torch.Tensor)]
        if odd:
            raise ValueError(f"added_cond_kwargs {odd} are not tensors (e.g. IP-Adapter image "
                             "embeddings); qlip carries tensor entries only")
        named.pop("return_dict", None)
        return cls(**{**{k: v for k, v in named.items() if k not in UNSUPPORTED},
                      ADDED: dict(added)})

    @property
    def batch_size(self) -> int:
        return self.sample.shape[0]

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the UNet call; absent conditioning is left out."""
        out: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs:
            out[ADDED] = self.added_cond_kwargs
        if self.cross_attention_kwargs is not None:
            out["cross_attention_kwargs"] = self.cross_attention_kwargs
        out.update({k: getattr(self, k) for k in OPTIONAL_TENSORS if getattr(self, k) is not None})
        return out

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by flat name: ``sample``, ..., ``added_cond_kwargs.<key>``."""
        named: dict[str, torch.Tensor] = {}
        self.map_tensors(lambda name, t: named.setdefault(name, t))
        return named

    def map_tensors(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> UNetInputs:
        """A copy with ``fn(flat_name, tensor)`` applied to every tensor (dict entries too)."""
        changed = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == ADDED:
                changed[ADDED] = {k: fn(f"{ADDED}.{k}", v) for k, v in value.items()}
            elif isinstance(value, torch.Tensor):
                changed[f.name] = fn(f.name, value)
        return replace(self, **changed)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> UNetInputs:
        """On ``device``; floating tensors (not the timestep) in ``dtype`` when given."""
        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            cast = dtype is not None and t.is_floating_point() and name != "timestep"
            return t.to(device, dtype) if cast else t.to(device)

        return self.map_tensors(move)

    def rows(self) -> UNetInputs:
        """One row per sample, detached, on CPU, floats in float32: the timestep expanded to
        ``[B]``, a conditioning tensor of batch 1 expanded to ``B`` (the UNet broadcasts it)."""
        batch = self.batch_size

        def row(name: str, t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if name == "timestep":
                t = t.flatten().expand(batch)
            elif t.ndim == 0 or t.shape[0] != batch:
                if t.ndim == 0 or t.shape[0] != 1:
                    raise ValueError(f"UNet input {name} has shape {tuple(t.shape)}; qlip records "
                                     f"one row per sample, so its first dim must be {batch} or 1")
                t = t.expand(batch, *t.shape[1:])
            t = t.cpu()
            return t.float() if t.is_floating_point() or name == "timestep" else t

        timestep = torch.as_tensor(self.timestep, device=self.sample.device)
        return replace(self, timestep=timestep).map_tensors(row)

    def select(self, index: torch.Tensor | slice) -> UNetInputs:
        """Rows ``index`` of inputs in row form (see :meth:`rows`)."""
        return self.map_tensors(lambda name, t: t[index])

    def conditioning(self) -> dict[str, torch.Tensor]:
        """The optional conditioning tensors, flat: ``added_cond_kwargs.<key>``, ``timestep_cond``..."""
        core = ("sample", "timestep", "encoder_hidden_states")
        return {k: v for k, v in self.named_tensors().items() if k not in core}

    @classmethod
    def from_conditioning(
        cls, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        conditioning: dict[str, torch.Tensor], cross_attention_kwargs: dict | None = None,
    ) -> UNetInputs:
        """The inverse of :meth:`conditioning`: flat keys back into their fields."""
        added, optional = {}, {}
        for key, value in conditioning.items():
            head, _, entry = key.partition(".")
            if head == ADDED and entry:
                added[entry] = value
            elif key in OPTIONAL_TENSORS:
                optional[key] = value
            else:
                raise ValueError(f"unknown UNet conditioning key {key!r}; expected "
                                 f"'{ADDED}.<name>' or one of {list(OPTIONAL_TENSORS)}")
        return cls(sample, timestep, encoder_hidden_states, added,
                   cross_attention_kwargs=cross_attention_kwargs, **optional)

    @classmethod
    def cat(cls, parts: Sequence[UNetInputs]) -> UNetInputs:
        """Rows of several inputs in row form, concatenated; they must share their conditioning
        keys and ``cross_attention_kwargs``."""
        first = parts[0]
        keys = set(first.conditioning())
        for part in parts[1:]:
            if set(part.conditioning()) != keys or (
                    part.cross_attention_kwargs != first.cross_attention_kwargs):
                raise ValueError("UNet calls with different conditioning inputs cannot be stacked "
                                 "into one calibration set; capture them separately")
        named = [p.named_tensors() for p in parts]
        return first.map_tensors(lambda name, _: torch.cat([n[name] for n in named]))


def call_unet(unet: nn.Module, inputs: UNetInputs) -> torch.Tensor:
    """Run ``unet`` on ``inputs`` (moved to its device and dtype) with every conditioning input;
    returns the prediction ``[B, C, H, W]``.

    >>> eps = call_unet(pipe.unet, data.inputs())  # doctest: +SKIP
    """
    inputs = inputs.to(unet.device, unet.dtype)
    return unet(inputs.sample, inputs.timestep, **inputs.kwargs(), return_dict=False)[0]
