"""QLIP's T2Q and Q2B in a quantized model's folder: ``qlip.json`` (format, version, configs,
the dynamic units' names in Q2B's order) and ``qlip.safetensors``; nothing is pickled.

Version 2 (version-1 folders still load): ``"t2q": null`` for a timestep-only Q2B
(``Q2BConfig.ignore_prompt``), which has no T2Q; ``"ignores_prompt"`` says so in the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...files import (
    CorruptFileError,
    check_format,
    load_tensors,
    read_json_dict,
    save_tensors,
    write_atomic,
)
from .q2b import Q2B, Q2BConfig
from .t2q import T2Q

FORMAT = "qlip-qlip"
VERSION = 2
CONFIG_FILE = "qlip.json"
STATE_FILE = "qlip.safetensors"
REMEDY = "train QLIP again (`qlip train-qlip`; its stages' caches are reused)"


@dataclass
class QLIPModules:
    """A trained T2Q and Q2B and the dynamic units Q2B's columns stand for (``t2q`` is None for a
    timestep-only Q2B, ``q2b.config.ignore_prompt``)."""

    t2q: T2Q | None
    q2b: Q2B
    unit_names: list[str]
    metrics: dict | None = None  # e.g. T2Q's held-out SROCC / PLCC, the training history tail

    def __post_init__(self):
        if self.t2q is None and not self.ignores_prompt:
            raise ValueError("a Q2B that reads the prompt's quality needs a T2Q; only a "
                             "timestep-only Q2B (Q2BConfig(ignore_prompt=True)) has none")

    @property
    def ignores_prompt(self) -> bool:
        return self.q2b.config.ignore_prompt


def has_qlip(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def save_qlip(modules: QLIPModules, folder: str | Path) -> Path:
    """Write ``qlip.json`` and ``qlip.safetensors`` into ``folder``.

    >>> save_qlip(QLIPModules(t2q, q2b, names), "runs/w4-qlip")  # doctest: +SKIP
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    t2q = modules.t2q
    state = {f"t2q.{k}": v for k, v in t2q.state_dict().items()} if t2q is not None else {}
    state |= {f"q2b.{k}": v for k, v in modules.q2b.state_dict().items()}
    save_tensors(state, out / STATE_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
    meta = {
        "format": FORMAT, "version": VERSION, "ignores_prompt": modules.ignores_prompt,
        "t2q": None if t2q is None else {"dim": t2q.dim, "hidden": t2q.hidden.out_features},
        "q2b": {"config": modules.q2b.config.to_dict(), "units": modules.q2b.num_units,
                "steps": modules.q2b.num_steps},
        "unit_names": list(modules.unit_names), "metrics": modules.metrics or {},
    }
    write_atomic(out / CONFIG_FILE, json.dumps(meta, indent=2))
    return out


def load_qlip(folder: str | Path, device: str | torch.device = "cpu") -> QLIPModules:
    """Read what :func:`save_qlip` wrote (refusing other formats and newer versions)."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train QLIP with `qlip train-qlip` first")
    meta = read_json_dict(path, REMEDY)
    check_format(meta, path, FORMAT, VERSION, REMEDY)
    state, _ = load_tensors(Path(folder) / STATE_FILE, REMEDY)
    try:
        t2q = None
        if meta["t2q"] is not None:
            t2q = T2Q(meta["t2q"]["dim"], meta["t2q"]["hidden"])
            t2q.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("t2q.")})
            t2q = t2q.to(device).eval().requires_grad_(False)
        q = meta["q2b"]
        q2b = Q2B(q["units"], q["steps"], Q2BConfig(**q["config"]))
        q2b.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("q2b.")})
        q2b = q2b.to(device).eval().requires_grad_(False)
        return QLIPModules(t2q, q2b, list(meta["unit_names"]), meta.get("metrics"))
    except (KeyError, TypeError, RuntimeError, ValueError) as err:  # fields or tensors amiss
        raise CorruptFileError(f"{path} and {STATE_FILE} do not describe a T2Q and Q2B "
                               f"({type(err).__name__}: {str(err)[:200]}); {REMEDY}") from err
