"""Sampling with a compiled UNet: ``torch.compile`` on the UNet's forward for the length of a
generation, the bits still data (a step's bit choice, a policy's per-prompt bits and the
per-step tables are device tensors the compiled graph reads, so they recompile nothing).

The UNet call the cost ledger counts MACs on stays eager (forward hooks on every layer,
:class:`~qlip.pipeline.accounting.MacCounter`, which a compiled graph would either trace or
recompile around): the first call of the first run of each latent and text shape, since the
counted sites are kept on the UNet; every other call runs compiled. The
compiled function is kept on the UNet, so the batches of an evaluation reuse its graphs (and,
with ``"reduce-overhead"``, its CUDA graphs). Images are the same model's, not bit-identical to
eager sampling: Inductor's fused kernels round some intermediate values differently."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# torch.compile's modes (Inductor); "reduce-overhead" replays each step from a CUDA graph
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The backend (tests set a cheaper one; modes apply to Inductor only)
BACKEND = "inductor"
_KEPT = "_qlip_compiled"  # the UNet attribute holding (mode, backend, compiled forward)


def check_compile_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES} (or None: eager); "
                         f"got {mode!r}")


def _compiled(unet: nn.Module, mode: str, original: Callable) -> Callable:
    """The UNet's compiled forward for ``mode``, made once and kept on the UNet. Kept with the
    UNet's id: a deep copy of the UNet copies the entry, whose function still calls the
    original's forward, so the copy compiles its own (the kept function holds the original
    alive, so its id is not reused meanwhile)."""
    kept = unet.__dict__.get(_KEPT)
    if kept is not None and kept[:3] == (mode, BACKEND, id(unet)):
        return kept[3]
    if BACKEND == "inductor":
        fn = torch.compile(original, mode=mode)
    else:
        fn = torch.compile(original, backend=BACKEND)
    unet.__dict__[_KEPT] = (mode, BACKEND, id(unet), fn)
    return fn


@contextmanager
def compiled_forward(unet: nn.Module, mode: str | None,
                     eager_when: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """For the block, ``unet``'s calls run its forward compiled (``mode``, one of
    :data:`COMPILE_MODES`; None: nothing changes), except the calls for which ``eager_when()``
    is true. The UNet's own forward comes back after the block."""
    check_compile_mode(mode)
    if mode is None or getattr(unet.forward, "_qlip_dispatch", False):  # (already compiled
        yield  # by an enclosing block)
        return
    had_own = "forward" in unet.__dict__
    original = unet.forward
    compiled = _compiled(unet, mode, original)

    def forward(*args, **kwargs):
        return (original if eager_when() else compiled)(*args, **kwargs)

    forward._qlip_dispatch = True
    unet.forward = forward
    try:
        yield
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward
