"""Training Q2B on FP trajectories (only Q2B learns: the UNet's weights and T2Q stay fixed).

Loss per batch of rows of one sampling step: ``mean((ε_fp − ε_q)²) + λ · penalty``. The quantized
UNet runs with every dynamic unit bound to Q2B's soft probabilities (forward: the argmax option;
backward: ``Σ_k p_k Q_k(x)``, the units' straight-through pattern). The penalty, ``penalty_norm``:

- ``"cadyq"`` (default, CADyQ's): per unit, ``mean_rows(b) / mean_rows(b).detach()`` averaged
  over units, b the straight-through bits (argmax forward, expected bits backward). Its value is
  1; its gradient is the relative change of each unit's bits, so λ weighs a 1 % bit change
  against the MSE whatever the option set.
- ``"max"``: the mean straight-through bits divided by the highest option (a value in (0, 1]).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...files import crash_point, load_tensors, save_tensors, write_atomic
from ...nn import QuantUnit
from ..calib_data import CalibrationSet
from ..runner import full_precision
from ..unet_inputs import call_unet
from .q2b import Q2B, expected_bits_ste

PENALTY_NORMS = ("cadyq", "max")
OPTIMIZERS = ("adam", "sgd")  # sgd: with momentum 0.9
SGD_MOMENTUM = 0.9


@dataclass
class Q2BTrainConfig:
    # iters, lr, lam and optimizer were chosen by measurement (docs/methods.md, "How Q2B's
    # defaults were chosen"; benchmarks/q2b_sweep.py)
    iters: int = 500  # optimiser steps (the H200 curves at lr 1e-2 settle by 300-400)
    batch_size: int = 8  # rows (guidance halves count separately) of one sampling step
    lr: float = 1e-1  # Q2B has 2U + 2GU parameters, all O(1); 1e-1 got there in half the steps
    lam: float = 0.1  # λ, the bit-penalty weight (where MSE against FAB bends, on {4,5,6})
    penalty_norm: str = "cadyq"
    optimizer: str = "adam"  # or "sgd" (momentum 0.9), which barely moved Q2B
    seed: int = 0
    checkpoint_every: int = 100  # iterations between checkpoints (resumable training)
    progress: bool = True

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("Q2BTrainConfig needs iters >= 0, batch_size >= 1, checkpoint_every >= 1")
        if self.lr <= 0 or self.lam < 0:
            raise ValueError(f"need lr > 0 and lam >= 0; got {self.lr}, {self.lam}")
        if self.penalty_norm not in PENALTY_NORMS:
            raise ValueError(f"penalty_norm must be one of {PENALTY_NORMS}; got {self.penalty_norm!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")


def option_map(units: list[QuantUnit], bits: tuple[int, ...]) -> torch.Tensor:
    """[J, K] one-hot: Q2B's option j → the units' bank slot of the same bit-width. Every unit
    must share one bank (same options), holding all of ``bits``."""
    options = units[0].options
    odd = [u.options for u in units if u.options != options]
    if odd:
        raise ValueError(f"Q2B training needs every dynamic unit to share one bank; found "
                         f"{options} and {odd[0]}")
    missing = sorted(set(bits) - set(options))
    if missing:
        raise ValueError(f"Q2B bits {list(bits)} need activation quantizers for {missing}; this "
                         f"model has {options}: quantize with --abits-options covering them")
    mapping = torch.zeros(len(bits), len(options))
    for j, b in enumerate(bits):
        mapping[j, options.index(b)] = 1.0
    return mapping


def bind_soft(units: list[QuantUnit], probs: torch.Tensor, mapping: torch.Tensor) -> None:
    """Bind every unit to its row of a [U, n, K] probability table (one tensor for all units)."""
    table = torch.einsum("nuj,jk->unk", probs, mapping.to(probs))
    for j, unit in enumerate(units):  # an attribute set per unit, no device work
        unit.bind_bits(table, j)


def penalty(q2b: Q2B, probs: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, FAB of the forward choice) of probabilities [n, U, J]."""
    bits = expected_bits_ste(q2b, probs)  # [n, U]
    per_unit = bits.mean(0)
    if norm == "cadyq":
        value = (per_unit / per_unit.detach().clamp_min(1e-6)).mean()
    else:
        value = per_unit.mean() / q2b.bit_values.max()
    return value, bits.detach().mean()


@torch.no_grad()
def fp_targets(unet: nn.Module, data: CalibrationSet, units: dict, batch_size: int = 16) -> torch.Tensor:
    """ε of the full-precision UNet (weights and activations) for every row, on CPU."""
    out = torch.empty_like(data.latents)
    with full_precision(units):
        for step in torch.unique(data.steps).tolist():
            index = torch.nonzero(data.steps == step).flatten()
            for unit in units.values():
                unit.set_step(step)
            for start in range(0, len(index), batch_size):
                sel = index[start : start + batch_size]
                out[sel] = call_unet(unet, data.subset(sel).inputs()).float().cpu()
    return out


CHECKPOINT_FILE = "q2b_ckpt.safetensors"


class _Checkpoint:
    """Q2B parameters, the optimiser state (Adam's moments or SGD's momentum) and the history,
    as safetensors + JSON (no pickle)."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def load(self, q2b: Q2B, optimizer: torch.optim.Optimizer) -> list[dict]:
        path = self.folder / CHECKPOINT_FILE if self.folder is not None else None
        if path is None or not path.exists():
            return []
        state, meta = load_tensors(path, f"delete {path} to train Q2B from its start")
        q2b.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        names = [n for n, _ in q2b.named_parameters()]
        for param, name in zip([p for g in optimizer.param_groups for p in g["params"]], names):
            # the moments live with the parameter (a GPU run resumes on the GPU); Adam keeps
            # its step count on the CPU
            if isinstance(optimizer, torch.optim.Adam):
                optimizer.state[param] = {"step": state[f"adam.{name}.step"],
                                          "exp_avg": state[f"adam.{name}.m"].to(param.device),
                                          "exp_avg_sq": state[f"adam.{name}.v"].to(param.device)}
            elif f"sgd.{name}.momentum" in state:
                optimizer.state[param] = {"momentum_buffer":
                                          state[f"sgd.{name}.momentum"].to(param.device)}
        return json.loads(meta["history"])

    def save(self, q2b: Q2B, optimizer: torch.optim.Optimizer, history: list[dict]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in q2b.state_dict().items()}
        for name, param in q2b.named_parameters():
            s = optimizer.state.get(param)
            if s and "exp_avg" in s:
                state |= {f"adam.{name}.step": s["step"].cpu().reshape(()),
                          f"adam.{name}.m": s["exp_avg"].cpu(), f"adam.{name}.v": s["exp_avg_sq"].cpu()}
            elif s and s.get("momentum_buffer") is not None:
                state[f"sgd.{name}.momentum"] = s["momentum_buffer"].cpu()
        # the history travels inside the one file: parameters and history are never of two steps
        save_tensors(state, self.folder / CHECKPOINT_FILE, {"history": json.dumps(history)})
        write_atomic(self.folder / "q2b_ckpt.json", json.dumps({"history": history}))  # to read
        crash_point("q2b-checkpoint")


def train_q2b(
    unet: nn.Module, q2b: Q2B, units: dict[str, QuantUnit], data: CalibrationSet,
    quality: torch.Tensor, config: Q2BTrainConfig | None = None, checkpoint: str | Path | None = None,
    targets: torch.Tensor | None = None,
) -> list[dict]:
    """Train ``q2b`` for the dynamic ``units`` (in Q2B's unit order) on rows ``data`` whose prompts
    have T2Q scores ``quality [N]``; returns the history (iteration, loss, mse, fab).
    With ``checkpoint``, training resumes from the folder's last checkpoint. ``targets``: the
    rows' FP ε (:func:`fp_targets`), when several trainings share one set of rows.

    >>> history = train_q2b(pipe.unet, q2b, dynamic, rows, q, Q2BTrainConfig(iters=200))  # doctest: +SKIP
    """
    config = config or Q2BTrainConfig()
    dynamic = [u for u in units.values() if u.dynamic]
    if len(dynamic) != q2b.num_units or len(quality) != len(data):
        raise ValueError(f"Q2B has {q2b.num_units} units for {len(dynamic)} dynamic units; "
                         f"{len(quality)} qualities for {len(data)} rows")
    if int(data.steps.max()) >= q2b.num_steps:
        raise ValueError(f"rows reach step {int(data.steps.max())}; Q2B covers {q2b.num_steps} steps")
    mapping = option_map(dynamic, q2b.config.bits)
    unet.requires_grad_(False)  # only Q2B learns
    optimizer = make_optimizer(q2b, config)
    ckpt = _Checkpoint(Path(checkpoint) if checkpoint else None)
    history = ckpt.load(q2b, optimizer)
    if len(history) >= config.iters:  # a finished run: nothing to compute
        return history
    if targets is None:
        targets = fp_targets(unet, data, units)
    elif targets.shape != data.latents.shape:
        raise ValueError(f"targets must be the rows' FP ε {tuple(data.latents.shape)}; got "
                         f"{tuple(targets.shape)}")
    by_step = {s: torch.nonzero(data.steps == s).flatten() for s in torch.unique(data.steps).tolist()}
    steps = sorted(by_step)
    bar = tqdm(range(len(history), config.iters), desc="Q2B", disable=not config.progress)
    try:
        for it in bar:
            # one generator per iteration: a resumed run draws the same rows as an uninterrupted one
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + it)
            step = steps[int(torch.randint(len(steps), (1,), generator=gen))]
            pool = by_step[step]
            rows = pool[torch.randperm(len(pool), generator=gen)[: config.batch_size]]
            history.append(_train_step(unet, q2b, units, dynamic, mapping, data, targets, quality,
                                       rows, step, optimizer, config) | {"iter": it})
            bar.set_postfix(mse=f"{history[-1]['mse']:.4g}", fab=f"{history[-1]['fab']:.2f}")
            if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iters:
                ckpt.save(q2b, optimizer, history)
    finally:
        for unit in dynamic:
            unit.bind_bits(None, 0)
    return history


def make_optimizer(q2b: Q2B, config: Q2BTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(q2b.parameters(), lr=config.lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(q2b.parameters(), lr=config.lr)


def _train_step(unet, q2b, units, dynamic, mapping, data, targets, quality, rows, step,
                optimizer, config) -> dict:
    for unit in units.values():
        unit.set_step(step)
    probs = q2b.probabilities(quality[rows], step)[0]  # [n, U, J]
    bind_soft(dynamic, probs, mapping)
    eps = call_unet(unet, data.subset(rows).inputs()).float()
    mse = torch.mean((eps - targets[rows].to(eps.device)) ** 2)
    pen, fab = penalty(q2b, probs, config.penalty_norm)
    loss = mse + config.lam * pen
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    values = {"loss": float(loss.detach()), "mse": float(mse.detach()), "fab": float(fab.detach())}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"Q2B training diverged at step {step}: {values}")
    return values


def config_dict(config: Q2BTrainConfig) -> dict:
    return asdict(config)
