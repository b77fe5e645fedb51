"""Bit policies: once per denoising step, the activation bit-width of every dynamic unit, per prompt."""

from .base import BitPolicy, FixedBits, PlannedBits, PromptBatch
from .per_layer import PerLayerBits
from .qlip import QLIPPolicy
from .random_matched import RandomMatchedBits

__all__ = ["BitPolicy", "FixedBits", "PerLayerBits", "PlannedBits", "PromptBatch", "QLIPPolicy",
           "RandomMatchedBits"]
