"""Training QLIP end to end on a quantized model (`qlip train-qlip`), and its figures."""

from .job import TrainQLIPConfig, check_inputs, train_qlip

__all__ = ["TrainQLIPConfig", "check_inputs", "train_qlip"]
