"""Quantization primitives: pure tensor functions and tiny modules, no diffusers here."""

from .bits import BYPASS_BITS, check_bits, is_bypass, parse_bits_list
from .grouped import StackedGrouped
from .grouping import GroupRangeObserver, GroupStats, choose_dimension, kmeans_groups, spread
from .log2 import Log2Quantizer, log2_quant
from .observer import RangeObserver
from .packing import pack_nibbles, unpack_nibbles
from .ranges import (
    affine_params,
    fake_quant,
    minmax_range,
    mse_range,
    percentile_range,
    search_range,
)
from .rounding import round_ste
from .stacked import RowLayout, StackedLog2, StackedQuantizer, StackedUniform, UniformSlot
from .uniform import RANGE_METHODS, UniformQuantizer

__all__ = [
    "BYPASS_BITS",
    "GroupRangeObserver",
    "GroupStats",
    "RANGE_METHODS",
    "Log2Quantizer",
    "RangeObserver",
    "RowLayout",
    "StackedGrouped",
    "StackedLog2",
    "StackedQuantizer",
    "StackedUniform",
    "UniformQuantizer",
    "UniformSlot",
    "affine_params",
    "check_bits",
    "choose_dimension",
    "fake_quant",
    "is_bypass",
    "kmeans_groups",
    "log2_quant",
    "minmax_range",
    "pack_nibbles",
    "mse_range",
    "parse_bits_list",
    "percentile_range",
    "round_ste",
    "search_range",
    "spread",
    "unpack_nibbles",
]
