"""Bit policies: once per denoising step, the activation bit-width of every dynamic unit, per prompt."""

from .base import BitPolicy, FixedBits, PromptBatch
from .qlip import QLIPPolicy

__all__ = ["BitPolicy", "FixedBits", "PromptBatch", "QLIPPolicy"]
