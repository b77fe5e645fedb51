"""QLIP's T2Q and Q2B in a quantized model's folder: ``qlip.json`` (format, version, configs,
the dynamic units' names in Q2B's order) and ``qlip.safetensors``; nothing is pickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .q2b import Q2B, Q2BConfig
from .t2q import T2Q

FORMAT = "qlip-qlip"
VERSION = 1
CONFIG_FILE = "qlip.json"
STATE_FILE = "qlip.safetensors"


@dataclass
class QLIPModules:
    """A trained T2Q and Q2B and the dynamic units Q2B's columns stand for."""

    t2q: T2Q
    q2b: Q2B
    unit_names: list[str]
    metrics: dict | None = None  # e.g. T2Q's held-out SROCC / PLCC, the training history tail


def has_qlip(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def save_qlip(modules: QLIPModules, folder: str | Path) -> Path:
    """Write ``qlip.json`` and ``qlip.safetensors`` into ``folder``.

    >>> save_qlip(QLIPModules(t2q, q2b, names), "runs/w4-qlip")  # doctest: +SKIP
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"t2q.{k}": v for k, v in modules.t2q.state_dict().items()}
    state |= {f"q2b.{k}": v for k, v in modules.q2b.state_dict().items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / STATE_FILE),
              metadata={"format": FORMAT, "version": str(VERSION)})
    meta = {
        "format": FORMAT, "version": VERSION,
        "t2q": {"dim": modules.t2q.dim, "hidden": modules.t2q.hidden.out_features},
        "q2b": {"config": modules.q2b.config.to_dict(), "units": modules.q2b.num_units,
                "steps": modules.q2b.num_steps},
        "unit_names": list(modules.unit_names), "metrics": modules.metrics or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_qlip(folder: str | Path, device: str | torch.device = "cpu") -> QLIPModules:
    """Read what :func:`save_qlip` wrote (refusing other formats and newer versions)."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train QLIP with `qlip train-qlip` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: not a qlip QLIP file of version <= {VERSION} "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    state = load_file(str(Path(folder) / STATE_FILE))
    t2q = T2Q(meta["t2q"]["dim"], meta["t2q"]["hidden"])
    t2q.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("t2q.")})
    q = meta["q2b"]
    q2b = Q2B(q["units"], q["steps"], Q2BConfig(**q["config"]))
    q2b.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("q2b.")})
    t2q, q2b = (m.to(device).eval().requires_grad_(False) for m in (t2q, q2b))
    return QLIPModules(t2q, q2b, list(meta["unit_names"]), meta.get("metrics"))
