"""Integer weight codes of at most 4 bits stored two per byte (low nibble first), the layout the
saved model uses: a W4 model's codes take half the bytes of one code per byte.

Written by hand: PyTorch has no 4-bit integer dtype with storage (``torch.uint4`` is a
placeholder without kernels) and torchao's packing is tied to its own tensor subclasses.

>>> codes = torch.tensor([[1, 15, 7], [0, 3, 9]], dtype=torch.uint8)
>>> packed = pack_nibbles(codes)                     # 3 bytes for 6 codes
>>> torch.equal(unpack_nibbles(packed, codes.shape), codes)
True
"""

from __future__ import annotations

import math

import torch

NIBBLE_BITS = 4


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (uint8, every value < 16, any shape) -> ``[ceil(n / 2)]`` uint8: code ``2i`` in
    the low nibble of byte ``i``, code ``2i + 1`` in its high nibble (an odd count pads a 0)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"4-bit packing takes uint8 codes; got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << NIBBLE_BITS:
        raise ValueError(f"codes up to {int(flat.max())} do not fit in {NIBBLE_BITS} bits")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << NIBBLE_BITS)


def unpack_nibbles(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the uint8 codes of ``shape``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (count + 1) // 2:
        raise ValueError(f"{tuple(packed.shape)} {packed.dtype} is not the 4-bit packing of "
                         f"{count} codes (shape {tuple(shape)})")
    low, high = packed & 0x0F, packed >> NIBBLE_BITS
    return torch.stack([low, high], dim=1).reshape(-1)[:count].reshape(shape)
