"""DGQ's grouped activation quantizer, stacked over bit-width options (bits are data, as in
:mod:`qlip.quant.stacked`): at each sampling step the input is split into groups along one
candidate dimension (channel or token), each group on its own uniform grid.

What is chosen per step is data too. Each candidate dim ``d`` has a derived table
``[K·T, 3, S_d]`` of per-index parameters (Δ, −z, 2^b − 1 − z) that is the group's where ``d``
is that step's dimension and neutral (1, −∞, +∞) where it is not; the forward divides by both
dims' Δ, rounds, clamps to both dims' bounds and multiplies back. Dividing or multiplying by
exactly 1 and clamping to ±∞ change nothing, so the result is exactly the chosen dim's
``clamp(round(x/Δ_g), −z_g, 2^b − 1 − z_g)·Δ_g`` — with gathers only, no branch on a value.

State (saved): ``scale``/``zero_point`` ``[K, T, G]`` and ``calibrated`` ``[K, T]`` as in
:class:`StackedUniform`; ``candidate_dims [D]`` (negative dims of the input), ``sizes [D]``
(0: the input has no such dim, e.g. the token dim of a ``[B, C]`` input), ``chosen_dim [T]``
(index into the candidates) and ``group_index_<d> [T, S_d]`` (each index's group, uint8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bits import is_bypass
from .ranges import affine_params
from .rounding import round_ste
from .stacked import StackedQuantizer

MAX_CANDIDATES = 2  # channel and token


class StackedGrouped(StackedQuantizer):
    """Per-step grouped uniform fake quantizer for each option (DGQ). Calibrated by
    :meth:`set_groups` (``qlip.methods.dgq``); uncalibrated rows give NaN.

    >>> q = StackedGrouped((4, 8), groups=2, dims=(-1, -2), num_steps=1)
    >>> q.set_groups(0, sizes=(3, 5), chosen=0, labels=torch.tensor([0, 0, 1]),
    ...              low=torch.tensor([-1.0, -50.0]), high=torch.tensor([1.0, 50.0]))
    >>> y = q(torch.randn(2, 5, 3), torch.tensor(1), step=torch.zeros(1, dtype=torch.long))
    """

    def __init__(self, options: Sequence[int], groups: int, dims: Sequence[int],
                 num_steps: int | None = None):
        super().__init__(options)
        dims = tuple(int(d) for d in dims)
        if not 1 <= len(dims) <= MAX_CANDIDATES or any(d >= 0 for d in dims):
            raise ValueError(f"candidate dims are 1 or 2 negative dims (channel, token); got {dims}")
        if groups < 1:
            raise ValueError(f"groups must be at least 1; got {groups}")
        self.groups = groups
        self.num_steps = num_steps
        k, t = len(self.options), num_steps or 1
        self.register_buffer("scale", torch.full((k, t, groups), float("nan")))
        self.register_buffer("zero_point", torch.zeros(k, t, groups))
        self.register_buffer("calibrated", torch.zeros(k, t, dtype=torch.bool))
        self.register_buffer("candidate_dims", torch.tensor(dims, dtype=torch.long))
        self.register_buffer("sizes", torch.zeros(len(dims), dtype=torch.long))
        self.register_buffer("chosen_dim", torch.zeros(t, dtype=torch.long))
        # group ids are small: stored in a byte each (a saved model stays small)
        self.index_dtype = torch.uint8 if groups <= 256 else torch.int32
        for i in range(len(dims)):
            self.register_buffer(f"group_index_{i}", torch.zeros(t, 0, dtype=self.index_dtype))
        for slot, bits in enumerate(self.options):
            if is_bypass(bits):
                self.scale[slot] = 1.0
                self.calibrated[slot] = True
        self.refresh()

    # -- calibration ----------------------------------------------------------------------------
    def set_groups(
        self, step: int | None, sizes: Sequence[int], chosen: int, labels: torch.Tensor,
        low: torch.Tensor, high: torch.Tensor, refresh: bool = True,
    ) -> None:
        """One step row (every row when ``step`` is None): group along candidate ``chosen``,
        ``labels [S]`` the group of each index, group ranges ``low``/``high`` ``[G]`` (each
        option's grid spans exactly its group's range). ``sizes``: every candidate's size (0
        where the input has no such dim). ``refresh=False``: the caller refreshes once at the end.
        """
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != len(self._dims) or not sizes[chosen]:
            raise ValueError(f"sizes {sizes} do not fit candidates {self._dims} (chosen {chosen})")
        if labels.numel() != sizes[chosen] or low.numel() != self.groups:
            raise ValueError(f"{labels.numel()} labels / {low.numel()} ranges for a dim of "
                             f"{sizes[chosen]} and {self.groups} groups")
        rows = slice(None) if step is None or not self.num_steps else slice(step, step + 1)
        with torch.no_grad():
            self._set_sizes(sizes)
            getattr(self, f"group_index_{chosen}")[rows] = labels.to(self.chosen_dim.device,
                                                                      self.index_dtype)
            self.chosen_dim[rows] = chosen
            for slot, bits in enumerate(self.options):
                if is_bypass(bits):
                    continue
                scale, zero = affine_params(low.float(), high.float(), bits, symmetric=False,
                                            include_zero=False)
                self.scale[slot, rows] = scale.to(self.scale)
                self.zero_point[slot, rows] = zero.to(self.zero_point)
                self.calibrated[slot, rows] = True
        if refresh:
            self.refresh()

    def _set_sizes(self, sizes: tuple[int, ...]) -> None:
        current = tuple(self.sizes.tolist())
        if current == sizes:
            return
        if any(current):
            raise ValueError(f"this quantizer was calibrated for sizes {current} along dims "
                             f"{self._dims}; got {sizes}: one resolution and prompt length")
        self.sizes.copy_(torch.tensor(sizes))
        t = self.num_steps or 1
        for i, size in enumerate(sizes):
            self.register_buffer(f"group_index_{i}", torch.zeros(
                t, size, dtype=self.index_dtype, device=self.chosen_dim.device))

    def slot_view(self, bits: int):
        raise ValueError("grouped quantizers are calibrated by DGQ (`qlip quantize --method dgq`), "
                         "not per bit-width")

    def calibrated_all(self) -> torch.Tensor:
        return self.calibrated.all()

    def check_calibrated(self) -> None:
        """Raise if an option or a step row was never calibrated (reads the device)."""
        if not bool(self.calibrated.all()):
            raise RuntimeError("this grouped activation quantizer was never calibrated at every "
                               "step; run `qlip quantize --method dgq`")

    def refresh(self) -> None:
        """Rebuild the per-index tables from the saved state (after calibration or load)."""
        self._dims = tuple(int(d) for d in self.candidate_dims.tolist())
        self._sizes = tuple(int(s) for s in self.sizes.tolist())
        for i in range(len(self._dims)):
            self.register_buffer(f"table_{i}", self._table(i), persistent=False)

    def _table(self, i: int) -> torch.Tensor:
        index = getattr(self, f"group_index_{i}").long()  # [T, S]
        k, t, _ = self.scale.shape
        gather = index[None].expand(k, t, index.shape[1])  # [K, T, S]
        scale = self.scale.gather(2, gather)
        zero = self.zero_point.to(self.scale).gather(2, gather)
        chosen = (self.chosen_dim == i)[None, :, None]  # [1, T, 1]
        top = self.levels.to(self.scale)[:, None, None] - zero
        inf = torch.tensor(float("inf"), device=scale.device)
        table = torch.stack([torch.where(chosen, scale, 1.0), torch.where(chosen, -zero, -inf),
                             torch.where(chosen, top, inf)], dim=2)  # [K, T, 3, S]
        return table.flatten(0, 1)

    # -- forward --------------------------------------------------------------------------------
    def _quantize(self, x, choice, step, split: bool, ste: bool = False) -> torch.Tensor:
        ste = ste or (torch.is_grad_enabled() and x.requires_grad)
        rows = self._rows(choice, step)
        scales, lows, highs = [], [], []
        for i, (dim, size) in enumerate(zip(self._dims, self._sizes)):
            if not size:
                continue  # the input has no such dim
            if x.shape[dim] != size:
                raise ValueError(
                    f"this input was calibrated with {size} entries along dim {dim}, got "
                    f"{x.shape[dim]}: DGQ's groups fix the resolution and prompt length; sample "
                    "at the calibration's height/width")
            params = getattr(self, f"table_{i}")[rows].to(x.dtype)  # [n, 3, S]
            scale, low, high = (self._broadcast(p, x, dim, split) for p in params.unbind(1))
            scales.append(scale)
            lows.append(low)
            highs.append(high)
        if len(scales) == 2 and not split:
            # One chosen dim per step, the other's entries neutral (Δ = 1, bounds ±∞): the
            # product of the two Δ is exactly the chosen one's, and the max/min of the bounds are
            # its bounds. Combined once on the small [1, ..., S_a, S_b] table, the whole-batch
            # input takes four passes instead of seven, with the same values bit for bit.
            scales = [scales[0] * scales[1]]
            lows, highs = [torch.maximum(*lows)], [torch.minimum(*highs)]
        q = x
        for scale in scales:
            q = q / scale
        q = round_ste(q) if ste else torch.round(q)
        for low, high in zip(lows, highs):
            q = torch.clamp(q, low, high)
        for scale in scales:
            q = q * scale
        return q

    @staticmethod
    def _broadcast(p: torch.Tensor, x: torch.Tensor, dim: int, split: bool) -> torch.Tensor:
        # p: [n, S] -> n on the image axis (0, or 1 of [copies, n, heads, ...]), S on ``dim``
        shape = [1] * x.ndim
        shape[1 if split else 0] = p.shape[0]
        shape[dim] = p.shape[1]
        return p.reshape(shape)

    def extra_repr(self) -> str:
        steps = f", steps={self.num_steps}" if self.num_steps else ""
        return f"options={self.options}, groups={self.groups}, dims={self._dims}{steps}"
