"""Q2B: QLIP's quality-to-bits module (paper Sec. 3, supplementary Fig. S2).

Per dynamic unit k: learnable ``s_k, o_k``, ``p_q = σ((q − 0.5)·s + o)``. Per group of ``M``
sampling steps: learnable ``p_m^t, p_h^t`` (one per unit, stored as logits, through a sigmoid).
The full (3-option) probabilities, the paper's formulas::

    p_low  = (1 − p_q) ⊙ (1 − p_m)
    p_med  = (1 − p_q) ⊙ p_m + p_q ⊙ (1 − p_h)
    p_high = p_q ⊙ p_h

Variants (``Q2BConfig.variant``; supplementary H): ``pq`` (2 options: 1 − p_q, p_q),
``pq_ph`` (low from p_q alone: 1 − p_q, p_q(1 − p_h), p_q p_h), ``pq_pm`` (high from p_q alone:
(1 − p_q)(1 − p_m), (1 − p_q) p_m, p_q), ``full`` (above), ``four`` (4 options: the medium
option split in two, (1 − p_q)(1 − p_m), (1 − p_q) p_m, p_q(1 − p_h), p_q p_h — the mlow/mhigh
of Fig. S2e). The first ``m`` steps are forced high: ``force="high"`` (default) makes them the
high option outright; ``force="p_q"`` sets only p_q = 1 (the paper's literal wording, which
leaves p_med = 1 − p_h in the full variant). Every array is [steps, images, units, options].

``ignore_prompt=True`` is the timestep-only control (issue 12): q is the constant 0.5 for every
prompt, so ``p_q = σ(o)`` per unit is a learned constant and the bits depend on the unit and the
step only (``s`` then has no effect and no gradient); a policy of it needs no T2Q.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

OPTION_COUNTS = {"pq": 2, "pq_ph": 3, "pq_pm": 3, "full": 3, "four": 4}
FORCE_MODES = ("high", "p_q")


@dataclass
class Q2BConfig:
    bits: tuple[int, ...] = (8, 16, 32)  # the paper's default option set, low → high
    variant: str = "full"
    # M and m kept after measurement (docs/methods.md, "How Q2B's defaults were chosen")
    group_steps: int = 5  # M: steps sharing one (p_m, p_h); 25 steps → 5 groups
    high_steps: int = 2  # m: first steps forced to the high option
    force: str = "high"
    init_s: float = 1.0
    init_o: float = 0.0  # p_q = 0.5 at q = 0.5
    init_logit: float = 0.0  # p_m = p_h = 0.5 at the start
    ignore_prompt: bool = False  # the timestep-only control: q = 0.5 whatever the prompt

    def __post_init__(self):
        self.bits = tuple(int(b) for b in self.bits)
        if self.variant not in OPTION_COUNTS:
            raise ValueError(f"Q2B variant must be one of {sorted(OPTION_COUNTS)}; got {self.variant!r}")
        if len(self.bits) != OPTION_COUNTS[self.variant]:
            raise ValueError(f"variant {self.variant!r} needs {OPTION_COUNTS[self.variant]} bit "
                             f"options; got {self.bits}")
        if list(self.bits) != sorted(set(self.bits)):
            raise ValueError(f"Q2B bits must be distinct and rising (low → high); got {self.bits}")
        if self.group_steps < 1 or self.high_steps < 0:
            raise ValueError(f"need group_steps >= 1 and high_steps >= 0; got {self.group_steps}, "
                             f"{self.high_steps}")
        if self.force not in FORCE_MODES:
            raise ValueError(f"force must be one of {FORCE_MODES}; got {self.force!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {"bits": list(self.bits)}


class Q2B(nn.Module):
    """The learnable bit chooser for ``units`` dynamic units over ``steps`` sampling steps.

    >>> q2b = Q2B(units=40, steps=25, config=Q2BConfig())
    >>> p = q2b.probabilities(torch.tensor([0.2, 0.9]), torch.arange(25))  # [25, 2, 40, 3]
    >>> bits = q2b.bits(torch.tensor([0.2, 0.9]), torch.arange(25))         # [25, 2, 40] long
    """

    def __init__(self, units: int, steps: int, config: Q2BConfig | None = None):
        super().__init__()
        self.config = config or Q2BConfig()
        if units < 1 or steps < 1:
            raise ValueError(f"Q2B needs units >= 1 and steps >= 1; got {units}, {steps}")
        self.num_steps = steps
        groups = -(-steps // self.config.group_steps)
        c = self.config
        self.s = nn.Parameter(torch.full((units,), c.init_s))
        self.o = nn.Parameter(torch.full((units,), c.init_o))
        self.m_logit = nn.Parameter(torch.full((groups, units), c.init_logit))
        self.h_logit = nn.Parameter(torch.full((groups, units), c.init_logit))
        self.register_buffer("bit_values", torch.tensor(c.bits, dtype=torch.long))

    @property
    def num_units(self) -> int:
        return self.s.shape[0]

    def p_q(self, q: torch.Tensor) -> torch.Tensor:
        """[n, U] = σ((q − 0.5)·s + o) for qualities ``q [n]`` (``ignore_prompt``: q = 0.5, so
        σ(o) for every prompt; the branch is on the config, never on a tensor value)."""
        q = q.float()
        if self.config.ignore_prompt:
            q = torch.full_like(q, 0.5)
        return torch.sigmoid((q[:, None] - 0.5) * self.s + self.o)

    def step_probabilities(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_m, p_h), each [S, 1, U], of the groups of sampling-step indices ``steps [S]``."""
        group = torch.clamp(steps.long() // self.config.group_steps, max=self.m_logit.shape[0] - 1)
        return torch.sigmoid(self.m_logit[group])[:, None], torch.sigmoid(self.h_logit[group])[:, None]

    def probabilities(self, q: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
        """[S, n, U, J] option probabilities (J = len(bits), low → high) for ``q [n]``."""
        steps = torch.as_tensor(steps, device=self.s.device).reshape(-1)
        p_q = self.p_q(q.to(self.s.device))[None]  # [1, n, U]
        p_m, p_h = self.step_probabilities(steps)
        forced = (steps < self.config.high_steps)[:, None, None]  # [S, 1, 1]
        if self.config.force == "p_q":
            p_q = torch.where(forced, torch.ones_like(p_q), p_q)
        p_q = p_q.expand(len(steps), -1, -1)
        probs = _combine(self.config.variant, p_q, p_m, p_h)
        if self.config.force == "high":
            high = torch.zeros_like(probs)
            high[..., -1] = 1.0
            probs = torch.where(forced[..., None], high, probs)
        return probs

    def bits(self, q: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
        """[S, n, U] argmax bit-widths (the forward choice)."""
        return self.bit_values[self.probabilities(q, steps).argmax(-1)]


def _combine(variant: str, p_q: torch.Tensor, p_m: torch.Tensor, p_h: torch.Tensor) -> torch.Tensor:
    """The option probabilities of one variant, stacked on a last axis (low → high)."""
    low_q = 1 - p_q
    if variant == "pq":
        parts = [low_q, p_q]
    elif variant == "pq_ph":
        parts = [low_q, p_q * (1 - p_h), p_q * p_h]
    elif variant == "pq_pm":
        parts = [low_q * (1 - p_m), low_q * p_m, p_q]
    elif variant == "full":
        parts = [low_q * (1 - p_m), low_q * p_m + p_q * (1 - p_h), p_q * p_h]
    else:  # "four"
        parts = [low_q * (1 - p_m), low_q * p_m, p_q * (1 - p_h), p_q * p_h]
    return torch.stack(torch.broadcast_tensors(*parts), dim=-1)


def expected_bits_ste(q2b: Q2B, probs: torch.Tensor) -> torch.Tensor:
    """Bits per [..., U] with a straight-through estimator (CADyQ): the argmax option's bits
    forward, ``Σ_j p_j b_j`` backward."""
    values = q2b.bit_values.to(probs.dtype)
    soft = (probs * values).sum(-1)
    hard = values[probs.argmax(-1)]
    return hard.detach() - soft.detach() + soft
