"""QLIP (Lee et al., ICCV 2025): T2Q predicts an image's quality from its prompt, Q2B turns that
quality and the sampling step into every dynamic unit's activation bits. See docs/methods.md."""

from .q2b import OPTION_COUNTS, Q2B, Q2BConfig, expected_bits_ste
from .store import QLIPModules, has_qlip, load_qlip, save_qlip
from .t2q import T2Q, T2QConfig, train_t2q
from .train import Q2BTrainConfig, train_q2b

__all__ = ["OPTION_COUNTS", "Q2B", "Q2BConfig", "Q2BTrainConfig", "QLIPModules", "T2Q",
           "T2QConfig", "expected_bits_ste", "has_qlip", "load_qlip", "save_qlip", "train_q2b",
           "train_t2q"]
