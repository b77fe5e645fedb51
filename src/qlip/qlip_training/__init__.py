"""Training QLIP end to end on a quantized model (`qlip train-qlip`), and its figures."""

from .job import Q2BInputs, TrainQLIPConfig, check_inputs, prepare_q2b, train_qlip

__all__ = ["Q2BInputs", "TrainQLIPConfig", "check_inputs", "prepare_q2b", "train_qlip"]
