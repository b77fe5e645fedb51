"""Calibration data as rows of UNet inputs (x_t, t, c and every conditioning input the pipeline
gave the UNet) with their sampling-step index; cached as safetensors, fed to a UNet step by step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import CorruptFileError, check_format, load_tensors, read_tensor_metadata, save_tensors
from .unet_inputs import UNetInputs, call_unet

FORMAT = "qlip-calibration"
VERSION = "2"  # 2: optional conditioning keys and cross_attention_kwargs; 1 had the four columns
COLUMNS = ("latents", "timesteps", "text", "steps")
REMEDY = "delete it and it is captured anew (`qlip quantize` captures it when missing)"


@dataclass
class CalibrationSet:
    """Rows of UNet inputs. ``steps`` is the sampling-step index each row was captured at;
    ``conditioning`` the optional conditioning per row, by flat name
    (``added_cond_kwargs.text_embeds``, ``added_cond_kwargs.time_ids``, ``timestep_cond``...).

    >>> data = CalibrationSet.from_inputs(inputs.rows(), steps)  # doctest: +SKIP
    >>> call_unet(unet, data.subset(torch.arange(4)).inputs())  # doctest: +SKIP
    """

    latents: torch.Tensor  # [N, C, H, W]  x_t
    timesteps: torch.Tensor  # [N]
    text: torch.Tensor  # [N, L, D]  encoder_hidden_states (conditional or unconditional)
    steps: torch.Tensor  # [N] long
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)  # each [N, ...]
    cross_attention_kwargs: dict | None = None  # one for every row

    def __len__(self) -> int:
        return self.latents.shape[0]

    @classmethod
    def from_inputs(cls, inputs: UNetInputs, steps: torch.Tensor) -> CalibrationSet:
        """A set from UNet inputs in row form (:meth:`UNetInputs.rows`)."""
        return cls(inputs.sample, inputs.timestep, inputs.encoder_hidden_states, steps,
                   inputs.conditioning(), inputs.cross_attention_kwargs)

    def inputs(self) -> UNetInputs:
        """All rows as one UNet input."""
        return UNetInputs.from_conditioning(self.latents, self.timesteps, self.text,
                                            self.conditioning, self.cross_attention_kwargs)

    def save(self, path: str | Path, fingerprint: dict | None = None) -> None:
        """One safetensors file, written atomically: the four columns, then the conditioning
        under its flat names; ``cross_attention_kwargs`` (JSON values only) and the
        ``fingerprint`` of what made the set (model, prompts, settings) in the metadata."""
        try:
            options = json.dumps(self.cross_attention_kwargs)
        except TypeError as err:
            raise ValueError(f"cross_attention_kwargs must hold JSON values to be saved with a "
                             f"calibration set; got {self.cross_attention_kwargs!r}") from err
        meta = {"format": FORMAT, "version": VERSION, "cross_attention_kwargs": options}
        if fingerprint is not None:
            meta["fingerprint"] = json.dumps(fingerprint, sort_keys=True, default=str)
        save_tensors(self.tensors(), path, metadata=meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four columns and the conditioning by flat name, contiguous on the CPU."""
        tensors = {name: getattr(self, name) for name in COLUMNS} | self.conditioning
        return {k: v.contiguous().cpu() for k, v in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor],
                     cross_attention_kwargs: dict | None = None) -> CalibrationSet:
        """The inverse of :meth:`tensors`."""
        rest = dict(tensors)
        columns = [rest.pop(name) for name in COLUMNS]
        return cls(*columns, conditioning=rest, cross_attention_kwargs=cross_attention_kwargs)

    @classmethod
    def cat(cls, sets: list[CalibrationSet]) -> CalibrationSet:
        """The rows of several sets, in order (same conditioning keys)."""
        keys = [set(s.conditioning) for s in sets]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"cannot concatenate calibration sets with conditioning {keys}")
        joined = {k: torch.cat([s.tensors()[k] for s in sets]) for k in sets[0].tensors()}
        return cls.from_tensors(joined, sets[0].cross_attention_kwargs)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        tensors, meta = load_tensors(path, REMEDY)
        if meta.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a qlip calibration set; {REMEDY}")
        check_format(meta, path, FORMAT, int(VERSION), REMEDY)
        missing = [c for c in COLUMNS if c not in tensors]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; {REMEDY}")
        return cls.from_tensors(tensors, json.loads(meta.get("cross_attention_kwargs", "null")))

    @staticmethod
    def saved_fingerprint(path: str | Path) -> dict | None:
        """The fingerprint a saved set was made with (None: written before sets had one, or
        not a calibration set), from its header alone."""
        meta = read_tensor_metadata(path, REMEDY)
        if meta.get("format") != FORMAT or "fingerprint" not in meta:
            return None
        try:
            return json.loads(meta["fingerprint"])
        except json.JSONDecodeError:
            return None

    def subset(self, index: torch.Tensor) -> CalibrationSet:
        columns = [getattr(self, name)[index] for name in COLUMNS]
        return CalibrationSet(*columns, {k: v[index] for k, v in self.conditioning.items()},
                              self.cross_attention_kwargs)

    def by_step(self, batch_size: int) -> Iterator[tuple[int, CalibrationSet]]:
        """Batches that each hold rows of one sampling step (per-step tables need that)."""
        for step in torch.unique(self.steps).tolist():
            rows = torch.nonzero(self.steps == step).flatten()
            for start in range(0, len(rows), batch_size):
                yield step, self.subset(rows[start : start + batch_size])


def run_calibration(
    unet: nn.Module, data: CalibrationSet, units: dict, batch_size: int = 8, progress: bool = True
) -> None:
    """Feed the captured inputs through the UNet, step by step, telling the units the step index."""
    batches = list(data.by_step(batch_size))
    with torch.no_grad():
        for step, batch in tqdm(batches, desc="calibrating", disable=not progress):
            for unit in units.values():
                unit.set_step(step)
            call_unet(unet, batch.inputs())
