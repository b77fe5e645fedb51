"""Bit-width conventions shared by every quantizer: 2..16 is real quantization, 32 is bypass."""

from __future__ import annotations

MIN_BITS = 2
MAX_REAL_BITS = 16
BYPASS_BITS = 32


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is a valid bit-width, else raise a ``ValueError`` saying what is allowed.

    >>> check_bits(8)
    8
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_REAL_BITS}] or 32; got {bits!r}")
    if bits == BYPASS_BITS or MIN_BITS <= bits <= MAX_REAL_BITS:
        return bits
    raise ValueError(
        f"{what} must be in [{MIN_BITS}, {MAX_REAL_BITS}] (real quantization) or 32 (full precision); "
        f"got {bits}"
    )


def is_bypass(bits: int) -> bool:
    return bits >= BYPASS_BITS


def parse_bits_list(text: str, what: str = "bit options") -> tuple[int, ...]:
    """Parse ``"8,16,32"`` into a sorted tuple of valid bit-widths."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be comma-separated integers such as 8,16,32; got {text!r}") from err
    if not values:
        raise ValueError(f"{what} is empty; give comma-separated bit-widths such as 8,16,32")
    return tuple(sorted({check_bits(v, what) for v in values}))
